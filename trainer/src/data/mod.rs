//! The data path: token shards, their manifest, corpus preparation and the batch loader.

pub mod inputs;
pub mod inspect;
pub mod loader;
pub mod manifest;
pub mod prepare;
pub mod qa;
pub mod shard;
pub mod stream;
pub mod verify;

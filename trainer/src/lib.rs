pub mod debug_state;

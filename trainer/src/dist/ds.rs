//! The `zero_optimization`, `comms_logger` and `wall_clock_breakdown` blocks of a DeepSpeed
//! config, read into [`ZeroConfig`] (see `train::deepspeed` for the rest of the file).

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::config::{OffloadDevice, ZeroConfig};
use crate::train::deepspeed::{enabled, int, num, object, unknown, DsConfig};

fn is_auto(v: &Value) -> bool {
    v.as_str() == Some("auto")
}

fn boolean(v: Option<&Value>, key: &str) -> Result<Option<bool>> {
    match v {
        None => Ok(None),
        Some(v) if is_auto(v) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .with_context(|| format!("`{key}` must be true, false or \"auto\", got {v}")),
    }
}

/// `zero_optimization.{offload_optimizer,offload_param}.device`.
fn offload(z: &Map<String, Value>, key: &str, out: &mut Vec<String>) -> Result<OffloadDevice> {
    let Some(b) = z.get(key) else {
        return Ok(OffloadDevice::None);
    };
    let b = object(b, &format!("zero_optimization.{key}"))?;
    unknown(
        b,
        &["device", "pin_memory"],
        &format!("zero_optimization.{key}."),
        out,
    );
    match b.get("device").and_then(Value::as_str) {
        None | Some("none") => Ok(OffloadDevice::None),
        Some("cpu") => Ok(OffloadDevice::Cpu),
        Some(d) => bail!("`zero_optimization.{key}.device` is {d:?}; this trainer offloads to \"cpu\" or \"none\" (NVMe is not supported)"),
    }
}

/// The `zero_optimization` block; keys this trainer does not know go to `out`.
pub(crate) fn read_zero(z: &Map<String, Value>, out: &mut Vec<String>) -> Result<ZeroConfig> {
    let k = |n: &str| format!("zero_optimization.{n}");
    let stage = int(z.get("stage"), &k("stage"))?.unwrap_or(0);
    if stage > 3 {
        bail!("`zero_optimization.stage` is {stage}; DeepSpeed stages are 0 to 3");
    }
    let mut zc = ZeroConfig::with_stage(stage as u8)?;
    let size = |n: &str, d: usize| -> Result<usize> {
        Ok(num(z.get(n), &k(n))?.map_or(d, |v| v.max(0.0) as usize))
    };
    zc.reduce_bucket_size = size("reduce_bucket_size", zc.reduce_bucket_size)?;
    zc.stage3_prefetch_bucket_size = size(
        "stage3_prefetch_bucket_size",
        zc.stage3_prefetch_bucket_size,
    )?;
    zc.stage3_param_persistence_threshold = size(
        "stage3_param_persistence_threshold",
        zc.stage3_param_persistence_threshold,
    )?;
    zc.stage3_max_live_parameters =
        size("stage3_max_live_parameters", zc.stage3_max_live_parameters)?;
    let flag = |n: &str, d: bool| -> Result<bool> { Ok(boolean(z.get(n), &k(n))?.unwrap_or(d)) };
    zc.overlap_comm = flag("overlap_comm", zc.overlap_comm)?;
    zc.contiguous_gradients = flag("contiguous_gradients", zc.contiguous_gradients)?;
    zc.stage3_gather_16bit_weights_on_model_save = flag(
        "stage3_gather_16bit_weights_on_model_save",
        zc.stage3_gather_16bit_weights_on_model_save,
    )?;
    zc.offload_optimizer = offload(z, "offload_optimizer", out)?;
    zc.offload_param = offload(z, "offload_param", out)?;
    let known = [
        "stage",
        "reduce_bucket_size",
        "overlap_comm",
        "contiguous_gradients",
        "offload_optimizer",
        "offload_param",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_gather_16bit_weights_on_model_save",
    ];
    unknown(z, &known, "zero_optimization.", out);
    Ok(zc)
}

/// The top-level `comms_logger` (`{"enabled": ...}`) and `wall_clock_breakdown` keys, into
/// the zero config (made with the defaults when the config has no `zero_optimization`).
pub(crate) fn read_logging(root: &Map<String, Value>, ds: &mut DsConfig) -> Result<()> {
    let comms = match root.get("comms_logger") {
        None => None,
        Some(v) => {
            let b = object(v, "comms_logger")?;
            unknown(
                b,
                &["enabled", "verbose", "prof_all", "debug"],
                "comms_logger.",
                &mut ds.unsupported,
            );
            enabled(b, "comms_logger")?
        }
    };
    let wall = boolean(root.get("wall_clock_breakdown"), "wall_clock_breakdown")?;
    if comms.is_some() || wall.is_some() {
        let z = ds.zero.get_or_insert_with(ZeroConfig::default);
        z.comms_logger = comms.unwrap_or(false);
        z.wall_clock_breakdown = wall.unwrap_or(false);
    }
    Ok(())
}

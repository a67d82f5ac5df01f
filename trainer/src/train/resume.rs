//! The rules of `--resume`: what it says when there is nothing to resume, and what may change
//! in the run config between the interrupted run and the resumed one.
//!
//! The checkpoint's `trainer_state.json` holds the run config it was trained with. A change of
//! the model's shape (sizes, norm, vocabulary) is an error: the weights would not fit, or would
//! silently be trained as another model. Any other change (schedule, data, steps) is allowed
//! but printed as one warning naming each key, old and new value.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use reference::MambaConfig;

/// The line printed when `--resume` finds no checkpoint in `out_dir`.
pub fn nothing_to_resume(out_dir: &Path) -> String {
    format!(
        "--resume: no checkpoint in {}; starting from scratch",
        super::state::checkpoints_dir(out_dir).display()
    )
}

/// The run config a training checkpoint was trained with (`trainer_state.json`'s
/// `config_toml`).
pub fn saved_config_toml(dir: &Path) -> Result<String> {
    let path = dir.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    v["config_toml"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{}: no \"config_toml\"", path.display()))
}

/// The fields of `old` and `new` that change the model's tensors, as `name old -> new`.
pub fn shape_changes(old: &MambaConfig, new: &MambaConfig) -> Vec<String> {
    let fields: [(&str, String, String); 11] = [
        ("d_model", old.d_model.to_string(), new.d_model.to_string()),
        ("n_layer", old.n_layer.to_string(), new.n_layer.to_string()),
        (
            "vocab_size",
            old.vocab_size.to_string(),
            new.vocab_size.to_string(),
        ),
        ("d_state", old.d_state.to_string(), new.d_state.to_string()),
        ("d_conv", old.d_conv.to_string(), new.d_conv.to_string()),
        ("d_inner", old.d_inner.to_string(), new.d_inner.to_string()),
        ("dt_rank", old.dt_rank.to_string(), new.dt_rank.to_string()),
        ("norm", format!("{:?}", old.norm), format!("{:?}", new.norm)),
        (
            "tie_embeddings",
            old.tie_embeddings.to_string(),
            new.tie_embeddings.to_string(),
        ),
        (
            "use_bias",
            old.use_bias.to_string(),
            new.use_bias.to_string(),
        ),
        (
            "conv_bias",
            old.conv_bias.to_string(),
            new.conv_bias.to_string(),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, a, b)| format!("{name} {a} -> {b}"))
        .collect()
}

/// Every leaf of a TOML document as `section.key` -> its TOML text.
fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// A value as printed in a warning: at most 60 characters.
fn short(v: Option<&String>) -> String {
    match v {
        None => "(unset)".into(),
        Some(s) if s.chars().count() > 60 => format!("{}…", s.chars().take(59).collect::<String>()),
        Some(s) => s.clone(),
    }
}

/// The keys whose values differ between two run configs (TOML text), as `key old -> new`,
/// sorted by key.
pub fn config_changes(old_toml: &str, new_toml: &str) -> Result<Vec<String>> {
    let parse = |s: &str, what: &str| -> Result<BTreeMap<String, String>> {
        let v: toml::Value = toml::from_str(s).with_context(|| format!("reading the {what}"))?;
        let mut flat = BTreeMap::new();
        flatten("", &v, &mut flat);
        Ok(flat)
    };
    let old = parse(old_toml, "run config saved in the checkpoint")?;
    let new = parse(new_toml, "new run config")?;
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| format!("{k} {} -> {}", short(old.get(k)), short(new.get(k))))
        .collect())
}

/// Checks a resume from the checkpoint `dir` (model `ck_model`, trained with the run config
/// `saved_toml`) against the new run config `new_toml`, which describes the model `new_model`
/// (`None` when it cannot be read, e.g. a moved `model.from`). A shape change is an error; the
/// other changes come back as one warning line, `None` when nothing changed.
pub fn check(
    dir: &Path,
    ck_model: &MambaConfig,
    new_model: Option<&MambaConfig>,
    saved_toml: &str,
    new_toml: &str,
) -> Result<Option<String>> {
    if let Some(new_model) = new_model {
        let shape = shape_changes(ck_model, new_model);
        if !shape.is_empty() {
            bail!(
                "--resume: checkpoint {} holds another model than the run config now describes \
                 ({}); resume with the config it was trained with, or start a new run in \
                 another --out-dir",
                dir.display(),
                shape.join(", ")
            );
        }
    }
    let changed = config_changes(saved_toml, new_toml)?;
    Ok((!changed.is_empty()).then(|| {
        format!(
            "warning: --resume: the run config changed since checkpoint {}: {}",
            dir.display(),
            changed.join("; ")
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_nested_keys_are_listed_with_old_and_new_values() {
        let old = "out_dir = \"a\"\n[train]\nsteps = 3\nbatch = 2\n[optim]\nlr = 0.001\n";
        let new = "out_dir = \"a\"\n[train]\nsteps = 6\nbatch = 2\n[eval]\nevery = 5\n";
        let c = config_changes(old, new).unwrap();
        assert_eq!(
            c,
            [
                "eval.every (unset) -> 5",
                "optim.lr 0.001 -> (unset)",
                "train.steps 3 -> 6"
            ]
        );
        assert!(config_changes(old, old).unwrap().is_empty());
    }

    #[test]
    fn a_shape_change_is_an_error_naming_the_fields() {
        let a = MambaConfig::new(64, 2, 264);
        let b = MambaConfig::new(128, 2, 264);
        let err = check(Path::new("ck"), &a, Some(&b), "", "").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("d_model 64 -> 128") && msg.contains("ck"),
            "{msg}"
        );
        assert!(check(Path::new("ck"), &a, Some(&a), "", "")
            .unwrap()
            .is_none());
    }
}

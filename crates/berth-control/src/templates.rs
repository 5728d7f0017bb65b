//! The template registry: built-in templates compiled into the binary plus
//! `*.toml` files from an operator directory (which may override a
//! built-in of the same name). Templates are parsed and checked once at
//! start, so a broken file stops the control plane with a clear error
//! instead of failing servers later.

use std::collections::BTreeMap;
use std::path::Path;

use berth_core::template::Template;

use crate::error::ControlError;

const BUILT_IN: &[(&str, &str)] = &[
    ("fakegame.toml", include_str!("templates/fakegame.toml")),
    ("minetest.toml", include_str!("templates/minetest.toml")),
    ("command.toml", include_str!("templates/command.toml")),
];

#[derive(Debug, Clone, Default)]
pub struct Templates {
    by_name: BTreeMap<String, Template>,
}

fn parse(origin: &str, text: &str) -> Result<Template, ControlError> {
    let t: Template = toml::from_str(text).map_err(|e| ControlError::Startup(format!("template {origin}: {e}")))?;
    t.check().map_err(|e| ControlError::Startup(format!("template {origin}: {e}")))?;
    Ok(t)
}

impl Templates {
    pub fn load(operator_dir: Option<&Path>) -> Result<Templates, ControlError> {
        let mut by_name = BTreeMap::new();
        for (file, text) in BUILT_IN {
            let t = parse(file, text)?;
            by_name.insert(t.name.clone(), t);
        }
        if let Some(dir) = operator_dir {
            let entries = std::fs::read_dir(dir).map_err(|e| ControlError::Startup(format!("cannot read template directory {}: {e}", dir.display())))?;
            let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "toml")) {
                let text = std::fs::read_to_string(&path).map_err(|e| ControlError::Startup(format!("cannot read template {}: {e}", path.display())))?;
                let t = parse(&path.display().to_string(), &text)?;
                by_name.insert(t.name.clone(), t);
            }
        }
        Ok(Templates { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Template> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Template> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_parse_and_check() {
        let t = Templates::load(None).unwrap();
        for name in ["fakegame", "minetest", "command"] {
            assert!(t.get(name).is_some(), "{name}");
        }
        assert!(t.get("command").unwrap().admin_only);
        for name in ["fakegame", "minetest"] {
            assert_eq!(t.get(name).unwrap().drivers(), vec!["process", "docker"], "{name} runs with both drivers");
        }
        assert_eq!(t.get("command").unwrap().drivers(), vec!["process"]);
    }

    #[test]
    fn operator_templates_override_and_broken_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("echo.toml"), "name = \"echo\"\n[process]\ncommand = \"/bin/echo\"\nready = \"alive\"\n").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        assert!(t.get("echo").is_some());
        std::fs::write(dir.path().join("bad.toml"), "name = \"bad\"\n[process]\ncommand = 3\n").unwrap();
        let e = Templates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
    }
}

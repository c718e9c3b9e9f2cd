//! `capstan export`: the stack file as manifests for a distributed engine,
//! with every setting that has no equivalent listed (its key path and why),
//! never silently dropped.

pub mod kubernetes;
pub mod operators;
pub mod swarm;

/// A setting of the stack file the target cannot express.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unmapped {
    /// Its key path in the stack file (`services.web.x-capstan.proxy`).
    pub path: String,
    pub why: String,
}

/// What an export made: named objects, and what did not map.
#[derive(Debug, Default)]
pub struct Export {
    /// File name (without extension) and the object.
    pub objects: Vec<(String, serde_json::Value)>,
    pub unmapped: Vec<Unmapped>,
}

impl Export {
    pub fn skip(&mut self, path: impl Into<String>, why: impl Into<String>) {
        self.unmapped.push(Unmapped {
            path: path.into(),
            why: why.into(),
        });
    }

    pub fn add(&mut self, name: impl Into<String>, object: impl serde::Serialize) {
        let value = serde_json::to_value(object).unwrap_or_default();
        self.objects.push((name.into(), value));
    }

    /// Every object as one multi-document YAML text.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for (_, o) in &self.objects {
            out.push_str("---\n");
            out.push_str(&yaml(o));
        }
        out
    }
}

/// One object as YAML.
pub fn yaml(o: &serde_json::Value) -> String {
    let mut text = serde_saphyr::to_string(o).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

//! The stack file: finding it, reading it, and turning it into a [`Stack`].

pub mod decode;
pub mod interp;
pub mod merge;
pub mod model;
pub mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use model::*;

/// Names tried, in order, when no `-f` is given.
pub const DEFAULT_FILES: &[&str] = &[
    "capstan.yaml",
    "capstan.yml",
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
];

/// One error or warning about a stack file, printed as `file:line:col: path: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    pub pos: yaml::Pos,
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.pos.line, self.pos.col)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A stack file that could not be loaded: every problem found, in file order.
#[derive(Debug)]
pub struct LoadError {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

#[derive(Debug, Clone)]
pub struct Loaded {
    pub stack: Stack,
    pub warnings: Vec<Diagnostic>,
    /// Absolute path of the stack file.
    pub file: PathBuf,
}

/// Where to read from and what to interpolate with.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The environment of the invoking shell.
    pub env: BTreeMap<String, String>,
    /// Active profiles; services with profiles run only when one is active.
    pub profiles: Vec<String>,
}

impl LoadOptions {
    pub fn from_process() -> Self {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let profiles = env
            .get("COMPOSE_PROFILES")
            .map(|p| {
                p.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        LoadOptions { env, profiles }
    }
}

/// Finds the stack file: the one given, or the first default name in `dir`.
pub fn find_file(given: Option<&Path>, dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("stack file {} not found", p.display()))
        };
    }
    DEFAULT_FILES
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no stack file in {}: create capstan.yaml (or compose.yaml), or pass -f FILE",
                dir.display()
            )
        })
}

fn single(file: &str, message: String) -> LoadError {
    LoadError {
        errors: vec![Diagnostic {
            file: file.to_owned(),
            pos: yaml::Pos::default(),
            path: String::new(),
            message,
        }],
        warnings: Vec::new(),
    }
}

/// Reads, interpolates and validates a stack file. Nothing is returned unless the
/// whole file is valid.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    load_with(path, &[], opts)
}

/// [`load`] with override files merged over the stack file, in order, as
/// compose merges them; paths in every file are relative to the first one's
/// directory, as in compose.
pub fn load_with(
    path: &Path,
    overrides: &[PathBuf],
    opts: &LoadOptions,
) -> Result<Loaded, LoadError> {
    let display = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let abs = std::path::absolute(path)
        .map_err(|e| single(&display, format!("cannot resolve path: {e}")))?;
    let text = std::fs::read_to_string(&abs)
        .map_err(|e| single(&display, format!("cannot read {}: {e}", abs.display())))?;
    let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
    let dotenv = match std::fs::read_to_string(dir.join(".env")) {
        Ok(t) => interp::parse_env_file(&t)
            .map_err(|(line, msg)| LoadError {
                errors: vec![Diagnostic {
                    file: ".env".into(),
                    pos: yaml::Pos {
                        line: line as u64,
                        col: 1,
                        file: 0,
                    },
                    path: String::new(),
                    message: msg,
                }],
                warnings: Vec::new(),
            })?
            .into_iter()
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    let default_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut files = vec![(display, text)];
    for o in overrides {
        let name = o.display().to_string();
        let text = std::fs::read_to_string(o)
            .map_err(|e| single(&name, format!("cannot read {name}: {e}")))?;
        files.push((name, text));
    }
    let mut stack = parse_files(&files, &dir, &default_name, dotenv, opts)?;
    let warnings = std::mem::take(&mut stack.1);
    Ok(Loaded {
        stack: stack.0,
        warnings,
        file: abs,
    })
}

/// Parses stack text (the part of [`load`] that needs no file system, except `env_file`).
pub fn parse_text(
    text: &str,
    display: &str,
    dir: &Path,
    default_name: &str,
    dotenv: BTreeMap<String, String>,
    opts: &LoadOptions,
) -> Result<(Stack, Vec<Diagnostic>), LoadError> {
    parse_files(
        &[(display.to_owned(), text.to_owned())],
        dir,
        default_name,
        dotenv,
        opts,
    )
}

/// Parses a stack file and the override files merged over it, in order
/// (display name, text).
pub fn parse_files(
    files: &[(String, String)],
    dir: &Path,
    default_name: &str,
    dotenv: BTreeMap<String, String>,
    opts: &LoadOptions,
) -> Result<(Stack, Vec<Diagnostic>), LoadError> {
    let mut root: Option<yaml::Node> = None;
    for (i, (display, text)) in files.iter().enumerate() {
        let mut node = yaml::parse(text).map_err(|e| LoadError {
            errors: vec![Diagnostic {
                file: display.clone(),
                pos: e.pos,
                path: String::new(),
                message: format!("invalid YAML: {}", e.message),
            }],
            warnings: Vec::new(),
        })?;
        match root.as_mut() {
            None => root = Some(node),
            Some(r) => {
                merge::stamp(&mut node, i as u16);
                merge::merge(r, node);
            }
        }
    }
    let root = root.unwrap_or(yaml::Node {
        pos: yaml::Pos::default(),
        kind: yaml::Kind::Null,
    });
    let vars = interp::Vars::new(dotenv, opts.env.clone());
    let mut dec = decode::Decoder {
        file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
        overrides: files.iter().skip(1).map(|f| f.0.clone()).collect(),
        dir,
        vars: &vars,
        env: &opts.env,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let stack = dec.stack(&root, default_name);
    let mut errors = dec.errors;
    let mut warnings = dec.warnings;
    errors.sort_by_key(|d| (d.pos.file, d.pos.line, d.pos.col));
    warnings.sort_by_key(|d| (d.pos.file, d.pos.line, d.pos.col));
    match stack {
        Some(mut stack) if errors.is_empty() => {
            stack.services.retain(|_, s| {
                s.profiles.is_empty() || s.profiles.iter().any(|p| opts.profiles.contains(p))
            });
            Ok((stack, warnings))
        }
        _ => Err(LoadError { errors, warnings }),
    }
}

/// The normalized stack as YAML, like `docker compose config`.
pub fn to_yaml(stack: &Stack) -> String {
    serde_saphyr::to_string(stack).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests;

//! The runtime's layers, as `docs/ARCHITECTURE.md` draws them: `state` imports
//! only `spec`; the supervisor, the proxy, the scraper and the autoscaler never
//! import one another (they meet in `state`: the board, the hooks, the handle).

use std::path::Path;

const SIBLINGS: [&str; 4] = ["supervisor", "proxy", "scrape", "autoscale"];

/// Every `crate::<module>` a directory's sources name, with where.
fn imports(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for (n, line) in text.lines().enumerate() {
                let mut rest = line;
                while let Some(i) = rest.find("crate::") {
                    rest = &rest[i + 7..];
                    let module: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    out.push((module, format!("{}:{}", p.display(), n + 1)));
                }
            }
        }
    }
    out
}

#[test]
fn runtime_siblings_do_not_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    for a in SIBLINGS {
        for (module, at) in imports(&src.join(a)) {
            if SIBLINGS.contains(&module.as_str()) && module != a {
                wrong.push(format!("{at}: {a} imports crate::{module}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn state_is_a_leaf_over_spec() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let wrong: Vec<String> = imports(&src.join("state"))
        .into_iter()
        .filter(|(m, _)| m != "state" && m != "spec")
        .map(|(m, at)| format!("{at}: state imports crate::{m}"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

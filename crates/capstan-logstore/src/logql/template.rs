//! The subset of Go's text/template that `line_format` and `label_format` use:
//! `{{.label}}`, `{{ __line__ }}`, `{{ __timestamp__ }}`, and pipes into
//! `ToUpper`/`upper`, `ToLower`/`lower`, `TrimSpace`/`trim`.

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Field { name: String, funcs: Vec<Func> },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Upper,
    Lower,
    Trim,
}

#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = src;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("template {src:?}: unclosed {{{{"))?;
            let action = after[..close]
                .trim()
                .trim_start_matches('-')
                .trim_end_matches('-')
                .trim();
            let mut pipe = action.split('|').map(str::trim);
            let head = pipe.next().unwrap_or("");
            let name = if let Some(n) = head.strip_prefix('.') {
                n.to_owned()
            } else if head == "__line__" || head == "__timestamp__" {
                head.to_owned()
            } else {
                return Err(format!(
                    "template {src:?}: cannot evaluate {head:?} (use .label, __line__ or __timestamp__)"
                ));
            };
            let funcs = pipe
                .map(|f| match f {
                    "ToUpper" | "upper" => Ok(Func::Upper),
                    "ToLower" | "lower" => Ok(Func::Lower),
                    "TrimSpace" | "trim" => Ok(Func::Trim),
                    other => Err(format!("template {src:?}: unknown function {other:?}")),
                })
                .collect::<Result<_, _>>()?;
            parts.push(Part::Field { name, funcs });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// Renders with `get` for labels and the entry's line and time.
    pub fn render(&self, get: &dyn Fn(&str) -> Option<String>, line: &str, ts_ns: i64) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Field { name, funcs } => {
                    let mut v = match name.as_str() {
                        "__line__" => line.to_owned(),
                        "__timestamp__" => ts_ns.to_string(),
                        n => get(n).unwrap_or_default(),
                    };
                    for f in funcs {
                        v = match f {
                            Func::Upper => v.to_uppercase(),
                            Func::Lower => v.to_lowercase(),
                            Func::Trim => v.trim().to_owned(),
                        };
                    }
                    out.push_str(&v);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_functions_and_line() {
        let t = Template::parse("{{.method}} {{ .path | ToUpper }} took {{.ms}}ms: {{__line__}}")
            .unwrap();
        let get = |n: &str| match n {
            "method" => Some("GET".to_string()),
            "path" => Some("/a".to_string()),
            _ => None,
        };
        assert_eq!(t.render(&get, "raw", 0), "GET /A took ms: raw");
        assert!(Template::parse("{{ .x").is_err());
        assert!(Template::parse("{{ printf \"%d\" .x }}").is_err());
    }
}

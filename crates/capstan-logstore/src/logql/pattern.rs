//! The `pattern` parser: literals and `<name>` captures (`<_>` skips), matched
//! left to right; a capture ends at the first occurrence of the literal after it.

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Cap(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Pattern {
    parts: Vec<Part>,
}

impl Pattern {
    pub fn parse(src: &str) -> Result<Pattern, String> {
        let p = Pattern::parse_any(src)?;
        if !p.parts.iter().any(|p| matches!(p, Part::Cap(Some(_)))) {
            return Err(format!("pattern {src:?} names no capture"));
        }
        Ok(p)
    }

    /// A pattern for line filters (`|>`, `!>`): captures may all be `<_>`.
    pub fn parse_filter(src: &str) -> Result<Pattern, String> {
        let p = Pattern::parse_any(src)?;
        if p.parts.is_empty() {
            return Err(format!("pattern {src:?} is empty"));
        }
        Ok(p)
    }

    fn parse_any(src: &str) -> Result<Pattern, String> {
        let mut parts = Vec::new();
        let mut rest = src;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('<')
                && let Some(end) = after.find('>')
                && (after[..end] == *"_"
                    || (!after[..end].is_empty()
                        && after[..end]
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !after.starts_with(|c: char| c.is_ascii_digit())))
            {
                let name = &after[..end];
                if matches!(parts.last(), Some(Part::Cap(_))) {
                    return Err(format!(
                        "pattern {src:?}: two captures must be separated by text"
                    ));
                }
                parts.push(Part::Cap((name != "_").then(|| name.to_owned())));
                rest = &after[end + 1..];
                continue;
            }
            let next = rest[1..].find('<').map_or(rest.len(), |i| i + 1);
            match parts.last_mut() {
                Some(Part::Lit(l)) => l.push_str(&rest[..next]),
                _ => parts.push(Part::Lit(rest[..next].to_owned())),
            }
            rest = &rest[next..];
        }
        Ok(Pattern { parts })
    }

    /// The named captures, or None when the line does not fit.
    pub fn captures<'a>(&self, line: &'a str) -> Option<Vec<(&str, &'a str)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while i < self.parts.len() {
            match &self.parts[i] {
                Part::Lit(l) => {
                    if !line[pos..].starts_with(l.as_str()) {
                        return None;
                    }
                    pos += l.len();
                }
                Part::Cap(name) => {
                    let end = match self.parts.get(i + 1) {
                        Some(Part::Lit(l)) => pos + line[pos..].find(l.as_str())?,
                        _ => line.len(),
                    };
                    if let Some(n) = name {
                        out.push((n.as_str(), &line[pos..end]));
                    }
                    pos = end;
                }
            }
            i += 1;
        }
        Some(out)
    }

    /// Whether the line fits (for `|>` and `!>` filters, which may name no capture).
    pub fn fits(&self, line: &str) -> bool {
        self.captures(line).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_line() {
        let p = Pattern::parse(r#"<ip> - - <_> "<method> <uri> <_>" <status> <size>"#).unwrap();
        let line = r#"10.0.0.1 - - [24/Nov/2026:00:00:01 +0000] "GET /api/items HTTP/1.1" 200 512"#;
        assert_eq!(
            p.captures(line).unwrap(),
            vec![
                ("ip", "10.0.0.1"),
                ("method", "GET"),
                ("uri", "/api/items"),
                ("status", "200"),
                ("size", "512")
            ]
        );
        assert!(p.captures("nothing like it").is_none());
        assert!(Pattern::parse("<a><b>").is_err());
        assert!(Pattern::parse("no captures").is_err());
        assert!(
            Pattern::parse_filter("GET <_> HTTP")
                .unwrap()
                .fits("GET /x HTTP/1.1")
        );
    }
}

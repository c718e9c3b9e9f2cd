//! `${VAR}` interpolation as compose does it, and `.env` files.

use std::collections::BTreeMap;

/// Variables visible to interpolation: the process environment over the `.env` file.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    vars: BTreeMap<String, String>,
}

impl Vars {
    pub fn new(
        dotenv: BTreeMap<String, String>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let mut vars = dotenv;
        vars.extend(env);
        Vars { vars }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

/// Replaces `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`,
/// `${VAR?err}`, `${VAR:+alt}`, `${VAR+alt}`; `$$` is a literal `$`.
/// Unset variables without a default become the empty string.
pub fn interpolate(input: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = matching_brace(r).ok_or_else(|| {
                format!("unterminated variable reference \"${{{r}\" (missing '}}')")
            })?;
            out.push_str(&expand_braced(&r[..end], vars)?);
            rest = &r[end + 1..];
        } else {
            let len = rest
                .char_indices()
                .find(|&(j, c)| {
                    !(c == '_' || c.is_ascii_alphanumeric()) || (j == 0 && c.is_ascii_digit())
                })
                .map(|(j, _)| j)
                .unwrap_or(rest.len());
            if len == 0 {
                return Err(format!(
                    "invalid variable reference at \"${}\": use $$ for a literal $",
                    rest.chars().take(10).collect::<String>()
                ));
            }
            out.push_str(vars.get(&rest[..len]).unwrap_or(""));
            rest = &rest[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Index of the `}` closing a `${`, allowing nested `${…}` in defaults.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn expand_braced(body: &str, vars: &Vars) -> Result<String, String> {
    let name_len = body
        .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .unwrap_or(body.len());
    let name = &body[..name_len];
    if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(format!("invalid variable name in \"${{{body}}}\""));
    }
    let op = &body[name_len..];
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let arg = |skip: usize| interpolate(&op[skip..], vars);
    if op.is_empty() {
        return Ok(value.unwrap_or("").to_owned());
    }
    if op.starts_with(":-") {
        return if set_nonempty {
            Ok(value.unwrap_or("").to_owned())
        } else {
            arg(2)
        };
    }
    if op.starts_with('-') {
        return match value {
            Some(v) => Ok(v.to_owned()),
            None => arg(1),
        };
    }
    if op.starts_with(":?") || op.starts_with('?') {
        let strict = op.starts_with(':');
        let ok = if strict {
            set_nonempty
        } else {
            value.is_some()
        };
        if ok {
            return Ok(value.unwrap_or("").to_owned());
        }
        let msg = arg(if strict { 2 } else { 1 })?;
        let msg = if msg.is_empty() {
            format!("variable {name} is required")
        } else {
            msg
        };
        return Err(format!(
            "required variable {name} is missing a value: {msg}"
        ));
    }
    if op.starts_with(":+") {
        return if set_nonempty {
            arg(2)
        } else {
            Ok(String::new())
        };
    }
    if op.starts_with('+') {
        return if value.is_some() {
            arg(1)
        } else {
            Ok(String::new())
        };
    }
    Err(format!("invalid variable reference \"${{{body}}}\""))
}

/// Parses a `.env` / `env_file` text: `KEY=VALUE` lines, `#` comments, optional
/// `export `, single quotes literal, double quotes with `\n`, `\t`, `\\`, `\"` escapes.
/// Returns the variables, or `(line number, message)` for the first bad line.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((key, value)) = line.split_once('=') else {
            // A bare name means "take it from the environment" in env_file; skip it here.
            if line.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
                continue;
            }
            return Err((idx + 1, format!("expected KEY=VALUE, found {line:?}")));
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c == '_' || c == '.' || c == '-' || c.is_ascii_alphanumeric())
        {
            return Err((idx + 1, format!("invalid variable name {key:?}")));
        }
        let value = value.trim();
        let value = if let Some(v) = value.strip_prefix('\'') {
            v.strip_suffix('\'')
                .ok_or((idx + 1, "unterminated single quote".to_owned()))?
                .to_owned()
        } else if let Some(v) = value.strip_prefix('"') {
            let v = v
                .strip_suffix('"')
                .ok_or((idx + 1, "unterminated double quote".to_owned()))?;
            unescape_double(v)
        } else {
            // An unquoted value ends at an inline comment (" #").
            match value.find(" #") {
                Some(i) => value[..i].trim_end().to_owned(),
                None => value.to_owned(),
            }
        };
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

fn unescape_double(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars::new(
            [("A".into(), "1".into()), ("EMPTY".into(), String::new())].into(),
            [("B".into(), "two".into())],
        )
    }

    #[test]
    fn forms() {
        let v = vars();
        let cases = [
            ("$A", "1"),
            ("${A}", "1"),
            ("x${B}y", "xtwoy"),
            ("${NOPE}", ""),
            ("${NOPE:-d}", "d"),
            ("${EMPTY:-d}", "d"),
            ("${EMPTY-d}", ""),
            ("${NOPE-d}", "d"),
            ("${A:+alt}", "alt"),
            ("${NOPE:+alt}", ""),
            ("${EMPTY+alt}", "alt"),
            ("$$A", "$A"),
            ("${NOPE:-${B}}", "two"),
            ("${NOPE:-a-${A}-b}", "a-1-b"),
            ("cost: 5$$", "cost: 5$"),
        ];
        for (input, want) in cases {
            assert_eq!(interpolate(input, &v).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn errors() {
        let v = vars();
        let e = interpolate("${NOPE:?set NOPE please}", &v).unwrap_err();
        assert!(e.contains("NOPE") && e.contains("set NOPE please"), "{e}");
        assert!(interpolate("${EMPTY?x}", &v).is_ok());
        assert!(interpolate("${EMPTY:?x}", &v).is_err());
        assert!(interpolate("${A", &v).unwrap_err().contains("unterminated"));
        assert!(interpolate("$ x", &v).is_err());
        assert!(interpolate("${1A}", &v).is_err());
    }

    #[test]
    fn env_files() {
        let text = "# c\nexport A=1\nB='x y'\nC=\"a\\nb\"\nD=v # comment\n\nBARE\n";
        let got = parse_env_file(text).unwrap();
        assert_eq!(
            got,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x y".into()),
                ("C".into(), "a\nb".into()),
                ("D".into(), "v".into()),
            ]
        );
        assert_eq!(parse_env_file("A=1\n=2\n").unwrap_err().0, 2);
    }
}

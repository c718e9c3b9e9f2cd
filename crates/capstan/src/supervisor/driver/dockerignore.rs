//! `.dockerignore`: which files of a build context are not sent to the
//! engine, with the Docker CLI's rules. One pattern per line (`#` starts a
//! comment line), paths relative to the context with `/` separators, a
//! leading `/` ignored; `*`, `?` and `[...]` match within one path element,
//! `**` any number of elements; `!` re-includes what an earlier pattern
//! excluded; the last matching pattern decides. A pattern that matches a
//! directory excludes everything under it.

/// One `.dockerignore` line.
#[derive(Debug, Clone)]
struct Pattern {
    parts: Vec<String>,
    exception: bool,
}

/// The parsed `.dockerignore` of a context.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

/// Lexically cleans a pattern as Go's `filepath.Clean` does: no empty or `.`
/// elements, `..` folding the one before.
fn clean(p: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| l != "..") {
                    out.pop();
                } else {
                    out.push("..".into());
                }
            }
            other => out.push(other.to_owned()),
        }
    }
    out
}

impl Ignore {
    pub fn parse(text: &str) -> Ignore {
        let mut patterns = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pat) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let parts = clean(pat);
            if parts.is_empty() {
                continue;
            }
            patterns.push(Pattern { parts, exception });
        }
        Ignore { patterns }
    }

    /// Whether `path` (relative, `/`-separated) is left out of the context.
    pub fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut excluded = false;
        for p in &self.patterns {
            // The path itself or one of the directories above it.
            let hit = (1..=parts.len()).any(|n| match_parts(&p.parts, &parts[..n]));
            if hit {
                excluded = !p.exception;
            }
        }
        excluded
    }

    /// Whether some exception could re-include a path under `dir`, so that
    /// an excluded directory must still be walked.
    pub fn may_include_under(&self, dir: &str) -> bool {
        let depth = dir.split('/').filter(|p| !p.is_empty()).count();
        self.patterns
            .iter()
            .any(|p| p.exception && (p.parts.len() > depth || p.parts.iter().any(|s| s == "**")))
    }
}

/// Glob matching with one wildcard that spans any run of items: the
/// classic walk that, on a mismatch, backtracks only to the last wildcard
/// (linear for most patterns, never exponential).
fn glob<P, T>(
    pat: &[P],
    items: &[T],
    is_star: impl Fn(&P) -> bool,
    one: impl Fn(&P, &T) -> bool,
) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < items.len() {
        if p < pat.len() && is_star(&pat[p]) {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && one(&pat[p], &items[i]) {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            // Let the last wildcard take one more item and retry.
            star = Some((sp, si + 1));
            p = sp + 1;
            i = si + 1;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(is_star)
}

/// Matches pattern elements against path elements; `**` spans any number.
fn match_parts(pat: &[String], path: &[&str]) -> bool {
    glob(
        pat,
        path,
        |p| p == "**",
        |p, s| match_element(p.as_bytes(), s.as_bytes()),
    )
}

/// One token of an element pattern.
enum Tok {
    Star,
    Any,
    Class(Vec<(u8, u8)>, bool),
    Lit(u8),
}

/// An element pattern's tokens; none when it is malformed (an unterminated
/// class or a trailing escape, which Go's `filepath.Match` rejects).
fn tokens(pat: &[u8]) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pat.len() {
        match pat[i] {
            b'*' => out.push(Tok::Star),
            b'?' => out.push(Tok::Any),
            b'\\' => {
                i += 1;
                out.push(Tok::Lit(*pat.get(i)?));
            }
            b'[' => {
                i += 1;
                let negate = matches!(pat.get(i), Some(b'^' | b'!'));
                if negate {
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let mut lo = *pat.get(i)?;
                    if lo == b']' && !first {
                        break;
                    }
                    first = false;
                    if lo == b'\\' {
                        i += 1;
                        lo = *pat.get(i)?;
                    }
                    let mut hi = lo;
                    if pat.get(i + 1) == Some(&b'-') && pat.get(i + 2).is_some_and(|b| *b != b']') {
                        hi = pat[i + 2];
                        i += 2;
                    }
                    ranges.push((lo, hi));
                    i += 1;
                }
                out.push(Tok::Class(ranges, negate));
            }
            b => out.push(Tok::Lit(b)),
        }
        i += 1;
    }
    Some(out)
}

/// Go's `filepath.Match` on one element: `*`, `?`, `[...]` (with `^` or `!`
/// negation and ranges) and `\` escapes.
fn match_element(pat: &[u8], s: &[u8]) -> bool {
    let Some(toks) = tokens(pat) else {
        return false;
    };
    glob(
        &toks,
        s,
        |t| matches!(t, Tok::Star),
        |t, c| match t {
            Tok::Star => false,
            Tok::Any => true,
            Tok::Lit(b) => b == c,
            Tok::Class(ranges, negate) => {
                ranges.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negate
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_the_docker_cli() {
        let i = Ignore::parse(
            "# comment\n\n*.md\n!README.md\nnode_modules\n/build/\n**/*.pyc\ntemp?\n[ab].txt\n./docs/../secret\n",
        );
        let ex = |p: &str| i.excludes(p);
        assert!(ex("CHANGES.md"));
        assert!(!ex("README.md"), "re-included");
        assert!(!ex("sub/CHANGES.md"), "* stays within one element");
        assert!(ex("node_modules"));
        assert!(
            ex("node_modules/a/b.js"),
            "everything under an excluded directory"
        );
        assert!(ex("build/out.o"));
        assert!(ex("a.pyc") && ex("x/y/z.pyc"));
        assert!(ex("temp1") && !ex("temp12"));
        assert!(ex("a.txt") && ex("b.txt") && !ex("c.txt"));
        assert!(ex("secret"));
        assert!(!ex("app.py"));
    }

    #[test]
    fn the_last_match_decides_and_exceptions_reach_into_directories() {
        let i = Ignore::parse("logs\n!logs/keep.log\n");
        assert!(i.excludes("logs/a.log"));
        assert!(!i.excludes("logs/keep.log"));
        assert!(i.may_include_under("logs"));
        let j = Ignore::parse("!a.txt\n*.txt\n");
        assert!(j.excludes("a.txt"), "a later pattern wins");
        assert!(!j.may_include_under("dir"));
    }

    #[test]
    fn classes_negation_and_escapes() {
        assert!(match_element(b"[^a]x", b"bx"));
        assert!(!match_element(b"[!a]x", b"ax"));
        assert!(match_element(b"[a-c]", b"b"));
        assert!(match_element(b"\\*", b"*"));
        assert!(!match_element(b"\\*", b"a"));
        assert!(!match_element(b"[ab", b"a"), "unterminated");
    }
}

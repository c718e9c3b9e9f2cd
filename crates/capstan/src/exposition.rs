//! Writing the exposition format: what the collectors, the proxy and the
//! autoscaler expose their metrics in (a leaf every component may use).

use std::fmt::Write;

/// Writes families in the text format 0.0.4.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A family's type line alone (federation writes no help).
    pub fn type_line(&mut self, name: &str, kind: &str) {
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.sample_at(name, labels, value, None);
    }

    /// A sample with an explicit timestamp (unix ms) when `t` is given.
    pub fn sample_at(&mut self, name: &str, labels: &[(&str, &str)], value: f64, t: Option<i64>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = if value.is_nan() {
            write!(self.out, " NaN")
        } else if value.is_infinite() {
            write!(self.out, " {}Inf", if value > 0.0 { "+" } else { "-" })
        } else {
            write!(self.out, " {value}")
        };
        let _ = match t {
            Some(t) => writeln!(self.out, " {t}"),
            None => writeln!(self.out),
        };
    }

    /// A family with one unlabeled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_expfmt::{Format, Parser};

    #[test]
    fn output_parses() {
        let mut e = Exposition::default();
        e.family("a_total", "counter", "A counter.");
        e.sample("a_total", &[("path", "/x\"y\\")], 1.5);
        e.single("b", "gauge", "A gauge.", f64::NAN);
        let text = e.finish();
        let entries: Vec<_> = Parser::new(&text, Format::Text)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(entries.len(), 6);
    }
}

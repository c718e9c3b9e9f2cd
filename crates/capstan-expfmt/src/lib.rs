//! Parser of the Prometheus exposition formats: text 0.0.4 and OpenMetrics 1.0 text.
//!
//! No I/O, no allocation per sample: entries borrow from the input, label values
//! are unescaped only when read. In OpenMetrics mode the whole exposition is
//! validated as the specification requires (families grouped, metadata before
//! samples, histogram and summary rules, `# EOF` last); the text 0.0.4 mode is
//! lenient, as Prometheus is.
//!
//! ```
//! use capstan_expfmt::{Entry, Format, Parser};
//! let text = "# TYPE a counter\na_total{path=\"/\"} 3 1700000000000\n";
//! let mut n = 0;
//! for entry in Parser::new(text, Format::Text) {
//!     if let Entry::Sample(s) = entry.unwrap() {
//!         assert_eq!(s.name, "a_total");
//!         assert_eq!(s.labels().next().unwrap().unwrap(), ("path", "/".into()));
//!         assert_eq!((s.value, s.timestamp_ms), (3.0, Some(1_700_000_000_000)));
//!         n += 1;
//!     }
//! }
//! assert_eq!(n, 1);
//! ```
#![forbid(unsafe_code)]

mod line;
mod openmetrics;

use std::borrow::Cow;
use std::fmt;

pub use line::Labels;

/// Which text format an exposition is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: lenient; timestamps in integer milliseconds.
    Text,
    /// OpenMetrics 1.0 text: strict; timestamps in seconds; must end with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format a scrape response is in, from its `Content-Type` (as Prometheus
    /// decides: `application/openmetrics-text` is OpenMetrics, anything else text).
    pub fn from_content_type(content_type: &str) -> Format {
        let media = content_type.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    /// The `Accept` header a scraper sends: OpenMetrics preferred, text as fallback.
    pub const ACCEPT: &'static str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    Unknown,
}

impl MetricType {
    fn parse(s: &str, format: Format) -> Option<MetricType> {
        Some(match s {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            "gaugehistogram" => MetricType::GaugeHistogram,
            "summary" => MetricType::Summary,
            "info" => MetricType::Info,
            "stateset" => MetricType::StateSet,
            "unknown" => MetricType::Unknown,
            "untyped" if format == Format::Text => MetricType::Unknown,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            MetricType::GaugeHistogram => "gaugehistogram",
            MetricType::Summary => "summary",
            MetricType::Info => "info",
            MetricType::StateSet => "stateset",
            MetricType::Unknown => "unknown",
        }
    }
}

/// An exemplar attached to a sample (OpenMetrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar<'a> {
    pub labels: Labels<'a>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Labels<'a>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
    pub exemplar: Option<Exemplar<'a>>,
}

impl<'a> Sample<'a> {
    /// The labels as `(name, value)`, values unescaped.
    pub fn labels(&self) -> impl Iterator<Item = Result<(&'a str, Cow<'a, str>), ParseError>> + 'a {
        self.labels.iter()
    }
}

/// One line of an exposition that carries information.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry<'a> {
    Help { name: &'a str, text: Cow<'a, str> },
    Type { name: &'a str, kind: MetricType },
    Unit { name: &'a str, unit: &'a str },
    Sample(Sample<'a>),
}

/// What is wrong with an exposition, and on which line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Iterates over the entries of an exposition. After the first error it ends.
pub struct Parser<'a> {
    rest: &'a str,
    format: Format,
    line_no: usize,
    done: bool,
    seen_eof: bool,
    om: Option<openmetrics::Validator<'a>>,
}

impl<'a> Parser<'a> {
    pub fn new(input: &'a str, format: Format) -> Parser<'a> {
        Parser {
            rest: input,
            format,
            line_no: 0,
            done: false,
            seen_eof: false,
            om: (format == Format::OpenMetrics).then(openmetrics::Validator::default),
        }
    }

    /// Parses bytes, which must be UTF-8.
    pub fn from_bytes(input: &'a [u8], format: Format) -> Result<Parser<'a>, ParseError> {
        match std::str::from_utf8(input) {
            Ok(s) => Ok(Parser::new(s, format)),
            Err(e) => {
                let line = input[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                Err(ParseError {
                    line,
                    message: "invalid UTF-8".into(),
                })
            }
        }
    }

    fn fail(&mut self, message: impl Into<String>) -> Option<Result<Entry<'a>, ParseError>> {
        self.done = true;
        Some(Err(ParseError {
            line: self.line_no,
            message: message.into(),
        }))
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = Result<Entry<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            if self.rest.is_empty() {
                self.done = true;
                if let Some(om) = self.om.as_mut() {
                    if !self.seen_eof {
                        self.line_no += 1;
                        return self.fail("missing \"# EOF\" at the end");
                    }
                    if let Err(m) = om.finish() {
                        return self.fail(m);
                    }
                }
                return None;
            }
            let (line, rest, had_newline) = match self.rest.find('\n') {
                Some(i) => (&self.rest[..i], &self.rest[i + 1..], true),
                None => (self.rest, "", false),
            };
            self.rest = rest;
            self.line_no += 1;
            if self.seen_eof {
                return self.fail("text after \"# EOF\"");
            }
            if self.format == Format::Text && !had_newline && line.trim().is_empty() {
                continue;
            }
            let parsed = match self.format {
                Format::Text => line::parse_text_line(line),
                Format::OpenMetrics => line::parse_om_line(line),
            };
            match parsed {
                Err(m) => return self.fail(m),
                Ok(line::Line::Skip) => continue,
                Ok(line::Line::Eof) => {
                    self.seen_eof = true;
                    if !self.rest.is_empty() {
                        self.line_no += 1;
                        return self.fail("text after \"# EOF\"");
                    }
                    continue;
                }
                Ok(line::Line::Entry(e)) => {
                    if let Some(om) = self.om.as_mut()
                        && let Err(m) = om.check(&e)
                    {
                        return self.fail(m);
                    }
                    return Some(Ok(e));
                }
            }
        }
    }
}

/// Parses a whole exposition, returning the first error.
pub fn parse_all(input: &str, format: Format) -> Result<Vec<Entry<'_>>, ParseError> {
    Parser::new(input, format).collect()
}

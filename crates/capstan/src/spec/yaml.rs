//! A YAML document as a tree of nodes that remember where they came from.
//!
//! serde-saphyr does the parsing; this module keeps every node's line and column
//! so that validation errors can point at the exact place in the stack file.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Position of a node in its file (1-based; 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u64,
    pub col: u64,
    /// Which of the stack's files (0: the first; overrides count from 1).
    pub file: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A short description of the value for error messages: `"two"`, `a list`, …
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Null => "null".into(),
            Kind::Bool(b) => b.to_string(),
            Kind::Int(i) => i.to_string(),
            Kind::Float(f) => f.to_string(),
            Kind::Str(s) => format!("{s:?}"),
            Kind::Seq(_) => "a list".into(),
            Kind::Map(_) => "a mapping".into(),
        }
    }

    /// The scalar as text, as compose reads it after interpolation.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.kind {
            Kind::Bool(b) => Some(b.to_string()),
            Kind::Int(i) => Some(i.to_string()),
            Kind::Float(f) => Some(f.to_string()),
            Kind::Str(s) => Some(s.clone()),
            _ => None,
        }
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(KindVisitor)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Kind, E> {
        Ok(Kind::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Kind, E> {
        Ok(Kind::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => Kind::Int(i),
            Err(_) => Kind::Str(v.to_string()),
        })
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Kind, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => Kind::Int(i),
            Err(_) => Kind::Str(v.to_string()),
        })
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Kind, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => Kind::Int(i),
            Err(_) => Kind::Str(v.to_string()),
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Kind, E> {
        Ok(Kind::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
        Ok(Kind::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Kind, E> {
        Ok(Kind::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Kind::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<Node, Node>()? {
            entries.push((k, v));
        }
        Ok(Kind::Map(entries))
    }
}

struct RawKind(Kind);

impl<'de> Deserialize<'de> for RawKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor).map(RawKind)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<RawKind>::deserialize(d)?;
        Ok(Node {
            pos: Pos {
                line: spanned.referenced.line(),
                col: spanned.referenced.column(),
                file: 0,
            },
            kind: spanned.value.0,
        })
    }
}

/// A YAML syntax error with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses one YAML document into a positioned tree. An empty document is `Null`.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    if text.trim().is_empty() {
        return Ok(Node {
            pos: Pos {
                line: 1,
                col: 1,
                file: 0,
            },
            kind: Kind::Null,
        });
    }
    serde_saphyr::from_str::<Node>(text).map_err(|e| {
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line(),
                col: l.column(),
                file: 0,
            })
            .unwrap_or_default();
        let message = e.without_snippet().to_string();
        SyntaxError { pos, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_keep_positions() {
        let n = parse("a:\n  b: 2\n  c: [x, \"two\"]\n").unwrap();
        let Kind::Map(top) = &n.kind else { panic!() };
        assert_eq!(top[0].0.kind, Kind::Str("a".into()));
        let Kind::Map(inner) = &top[0].1.kind else {
            panic!()
        };
        assert_eq!(inner[0].1.kind, Kind::Int(2));
        assert_eq!(
            inner[0].1.pos,
            Pos {
                line: 2,
                col: 6,
                file: 0
            }
        );
        let Kind::Seq(items) = &inner[1].1.kind else {
            panic!()
        };
        assert_eq!(items[1].kind, Kind::Str("two".into()));
        assert_eq!(items[1].pos.line, 3);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e:?}");
    }
}

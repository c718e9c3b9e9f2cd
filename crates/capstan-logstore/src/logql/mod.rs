//! LogQL: parsing into [`ast::Expr`].

pub mod ast;
pub mod eval;
mod lex;
mod parse;
pub mod pattern;
pub mod pipeline;
pub mod template;

pub use lex::{parse_bytes, parse_duration};

/// A query that does not parse: where (byte offset) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parse error at column {}: {msg}", at + 1)]
pub struct ParseError {
    pub at: usize,
    pub msg: String,
}

/// Parses a LogQL query.
pub fn parse(src: &str) -> Result<ast::Expr, ParseError> {
    if src.len() > 64 << 10 {
        return Err(ParseError {
            at: 0,
            msg: "query longer than 64 KiB".into(),
        });
    }
    parse::Parser::new(lex::lex(src)?).parse_top()
}

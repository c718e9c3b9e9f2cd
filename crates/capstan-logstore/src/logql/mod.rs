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

/// The longest query accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 64 << 10;
/// The deepest nesting of `(`, `[` and `{` accepted.
pub const MAX_NESTING: usize = 128;
/// The most binary operators (arithmetic, comparison, `and`/`or`/`unless`, `,`
/// between label filters) accepted in one query.
pub const MAX_OPERATORS: usize = 1024;

/// Parses a LogQL query. Its nesting and operators are bounded before parsing,
/// so the parser, the evaluator and dropping the tree recurse a bounded depth.
pub fn parse(src: &str) -> Result<ast::Expr, ParseError> {
    if src.len() > MAX_QUERY_BYTES {
        return Err(ParseError {
            at: 0,
            msg: format!("query longer than {} KiB", MAX_QUERY_BYTES >> 10),
        });
    }
    let toks = lex::lex(src)?;
    check_shape(&toks)?;
    parse::Parser::new(toks).parse_top()
}

fn check_shape(toks: &[lex::Token]) -> Result<(), ParseError> {
    use lex::Tok;
    let (mut depth, mut braces, mut ops) = (0usize, 0usize, 0usize);
    for t in toks {
        match &t.tok {
            Tok::LParen | Tok::LBracket | Tok::LBrace => {
                depth += 1;
                braces += usize::from(t.tok == Tok::LBrace);
                if depth > MAX_NESTING {
                    return Err(ParseError {
                        at: t.at,
                        msg: format!("the query nests deeper than {MAX_NESTING} levels"),
                    });
                }
            }
            Tok::RParen | Tok::RBracket | Tok::RBrace => {
                depth = depth.saturating_sub(1);
                if t.tok == Tok::RBrace {
                    braces = braces.saturating_sub(1);
                }
            }
            Tok::Plus
            | Tok::Minus
            | Tok::Star
            | Tok::Slash
            | Tok::Percent
            | Tok::Caret
            | Tok::EqEq
            | Tok::BangEq
            | Tok::Gt
            | Tok::Ge
            | Tok::Lt
            | Tok::Le
            | Tok::Comma
                if braces == 0 =>
            {
                ops += 1
            }
            Tok::Ident(w) if braces == 0 && matches!(w.as_str(), "and" | "or" | "unless") => {
                ops += 1
            }
            _ => {}
        }
        if ops > MAX_OPERATORS {
            return Err(ParseError {
                at: t.at,
                msg: format!("the query has more than {MAX_OPERATORS} operators"),
            });
        }
    }
    Ok(())
}

//! Templates and expressions simple enough to be evaluated without the template engine.
//!
//! Most `[rule.fields]` and `[rule.payload]` entries are text with a few `{{ name }}`
//! references, a filter such as `lower` or `trim`, or an expression such as `order_id | int`
//! or `state == 'CRITICAL'`. Running the engine for those costs far more than the work itself
//! (and, right after a message was parsed, its code and data are no longer in the CPU caches).
//! The forms below are recognised at load time and computed directly when every value they
//! touch is plain (a text, or for comparisons an integer); anything else — an undefined name, a
//! number where text is expected, a value that does not convert — goes to the engine, which
//! gives the result or the error it always gave. Tests compare both ways over many values.
//!
//! Template pieces (`{{ ... }}` inside text):
//!
//! ```text
//! name | name.attr | headers['Name'] | (list + list ...)
//!     followed by any of | lower | upper | trim | title | replace('a', 'b') | join('sep')
//! ```
//!
//! (`replace` only when the replacement is no longer than what it replaces; `join` and `+`
//! only of the address lists `to`, `cc` and `reply_to`, and a sum only when joined; a field
//! holding an integer only without filters.) Expressions (`{ expr = "..." }`):
//!
//! ```text
//! name | filters... | int         name | filters... | float       name | filters...
//!     each optionally followed by `if name is defined else none`
//! a == b            a != b              (a, b: names or 'text' literals)
//! ```

use super::context::{Context, RESERVED};
use serde_json::Value as Json;
use std::borrow::Cow;

/// Words that are not names in the template language, whatever the fields are called.
const KEYWORDS: &[&str] = &[
    "true", "false", "none", "True", "False", "None", "and", "or", "not", "if", "else", "is", "in", "loop", "self",
    "super", "caller", "varargs", "kwargs",
];

/// A piece of a simple template.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Part {
    Text(String),
    /// A value, then the filters applied to it in order.
    Value(Path, Vec<Filter>),
}

/// What a template piece refers to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Path {
    /// `name` or `name.attr`.
    Name(String, Option<String>),
    /// `headers['Name']`: the first header of that name, case-insensitively.
    Header(String),
    /// `(a + b + ...)`: address lists one after the other.
    Sum(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Filter {
    Lower,
    Upper,
    Trim,
    Title,
    /// `replace('from', 'to')`, `to` no longer than `from`.
    Replace(String, String),
    /// `join('sep')` of the address list `to`, `cc` or `reply_to`.
    Join(String),
}

/// What an expression's filters end with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Conversion {
    /// None: the text.
    Text,
    Int,
    Float,
}

/// A simple expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    /// `name | filters | int` (or `float`, or neither); with `if name is defined else none`
    /// when `if_defined`.
    Convert { name: String, filters: Vec<Filter>, to: Conversion, if_defined: bool },
    /// `a == b` (`equal`) or `a != b`.
    Compare { left: Operand, right: Operand, equal: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    Name(String),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Token<'a> {
    Ident(&'a str),
    Str(&'a str),
    Pipe,
    Dot,
    Plus,
    Eq,
    Ne,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
}

/// The tokens of `s`, or `None` at anything outside the small language above (numbers,
/// escapes in strings, other operators, ...).
fn tokens(s: &str) -> Option<Vec<Token<'_>>> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let single = match b {
            b'|' => Some(Token::Pipe),
            b'.' => Some(Token::Dot),
            b'+' => Some(Token::Plus),
            b'(' => Some(Token::LParen),
            b')' => Some(Token::RParen),
            b'[' => Some(Token::LBracket),
            b']' => Some(Token::RBracket),
            b',' => Some(Token::Comma),
            _ => None,
        };
        if let Some(token) = single {
            out.push(token);
            i += 1;
            continue;
        }
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'=' | b'!' if bytes.get(i + 1) == Some(&b'=') => {
                out.push(if b == b'=' { Token::Eq } else { Token::Ne });
                i += 2;
            }
            b'\'' | b'"' => {
                let end = i + 1 + s[i + 1..].find(b as char)?;
                let text = &s[i + 1..end];
                if text.contains('\\') {
                    return None;
                }
                out.push(Token::Str(text));
                i = end + 1;
            }
            _ if b.is_ascii_alphabetic() || b == b'_' => {
                let end = s[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(s.len(), |n| i + n);
                out.push(Token::Ident(&s[i..end]));
                i = end;
            }
            _ => return None,
        }
    }
    Some(out)
}

fn is_name(s: &str) -> bool {
    !KEYWORDS.contains(&s)
}

/// The parts of a template made only of text and `{{ ... }}` pieces of the forms above;
/// `None` for anything else (tags, comments, whitespace control, a trailing newline, which
/// the template engine would drop).
pub(crate) fn template_parts(template: &str) -> Option<Vec<Part>> {
    if template.contains("{%") || template.contains("{#") || template.ends_with('\n') {
        return None;
    }
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        let inner = &after[..end];
        if inner.starts_with(['-', '+']) || inner.ends_with(['-', '+']) {
            return None;
        }
        parts.push(piece(&tokens(inner)?)?);
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return None;
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Some(parts)
}

/// One `{{ ... }}` piece.
fn piece(tokens: &[Token<'_>]) -> Option<Part> {
    let (path, rest) = match tokens {
        [Token::Ident("headers"), Token::LBracket, Token::Str(name), Token::RBracket, rest @ ..] => {
            (Path::Header(name.to_string()), rest)
        }
        [Token::Ident(name), Token::Dot, Token::Ident(attr), rest @ ..] if is_name(name) => {
            (Path::Name(name.to_string(), Some(attr.to_string())), rest)
        }
        [Token::Ident(name), rest @ ..] if is_name(name) => (Path::Name(name.to_string(), None), rest),
        [Token::LParen, Token::Ident(first), rest @ ..] if is_name(first) => {
            let mut lists = vec![first.to_string()];
            let mut rest = rest;
            while let [Token::Plus, Token::Ident(name), more @ ..] = rest
                && is_name(name)
            {
                lists.push(name.to_string());
                rest = more;
            }
            let [Token::RParen, rest @ ..] = rest else { return None };
            if lists.len() < 2 {
                return None;
            }
            (Path::Sum(lists), rest)
        }
        _ => return None,
    };
    let (filters, rest) = filters(rest);
    rest.is_empty().then_some(Part::Value(path, filters))
}

/// The filters at the start of `tokens`, and the tokens after them.
fn filters<'t, 'a>(mut tokens: &'t [Token<'a>]) -> (Vec<Filter>, &'t [Token<'a>]) {
    let mut filters = Vec::new();
    loop {
        let (filter, rest) = match tokens {
            [Token::Pipe, Token::Ident("lower"), rest @ ..] => (Filter::Lower, rest),
            [Token::Pipe, Token::Ident("upper"), rest @ ..] => (Filter::Upper, rest),
            [Token::Pipe, Token::Ident("trim"), rest @ ..] => (Filter::Trim, rest),
            [Token::Pipe, Token::Ident("title"), rest @ ..] => (Filter::Title, rest),
            [
                Token::Pipe,
                Token::Ident("replace"),
                Token::LParen,
                Token::Str(from),
                Token::Comma,
                Token::Str(to),
                Token::RParen,
                rest @ ..,
            ] if to.len() <= from.len() => (Filter::Replace(from.to_string(), to.to_string()), rest),
            [Token::Pipe, Token::Ident("join"), Token::LParen, Token::Str(sep), Token::RParen, rest @ ..] => {
                (Filter::Join(sep.to_string()), rest)
            }
            _ => return (filters, tokens),
        };
        filters.push(filter);
        tokens = rest;
    }
}

/// The simple expression `expr` is, if it is one.
pub(crate) fn expression(expr: &str) -> Option<Expr> {
    let operand = |t: &Token<'_>| match t {
        Token::Ident(name) if is_name(name) => Some(Operand::Name(name.to_string())),
        Token::Str(text) => Some(Operand::Text(text.to_string())),
        _ => None,
    };
    let tokens = tokens(expr)?;
    if let [left, op @ (Token::Eq | Token::Ne), right] = tokens.as_slice() {
        return Some(Expr::Compare { left: operand(left)?, right: operand(right)?, equal: *op == Token::Eq });
    }
    let [Token::Ident(name), rest @ ..] = tokens.as_slice() else { return None };
    if !is_name(name) {
        return None;
    }
    let (filters, rest) = filters(rest);
    if filters.iter().any(|f| matches!(f, Filter::Join(_))) {
        return None; // `join` of a text joins its characters: left to the engine
    }
    let (to, rest) = match rest {
        [Token::Pipe, Token::Ident("int"), rest @ ..] => (Conversion::Int, rest),
        [Token::Pipe, Token::Ident("float"), rest @ ..] => (Conversion::Float, rest),
        _ if !filters.is_empty() => (Conversion::Text, rest),
        _ => return None,
    };
    let if_defined = match rest {
        [] => false,
        [
            Token::Ident("if"),
            Token::Ident(again),
            Token::Ident("is"),
            Token::Ident("defined"),
            Token::Ident("else"),
            Token::Ident("none"),
        ] if again == name => true,
        _ => return None,
    };
    Some(Expr::Convert { name: name.to_string(), filters, to, if_defined })
}

/// The text of `parts`, or `None` when the engine must render it.
pub(crate) fn render(parts: &[Part], ctx: &Context<'_>) -> Option<String> {
    // Room for the text and a short value in each place, so that most renderings allocate once.
    let room = parts.iter().map(|p| if let Part::Text(t) = p { t.len() } else { 32 }).sum();
    let mut out = String::with_capacity(room);
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Value(path, filters) => {
                let mut filters = filters.iter();
                let mut value = match path {
                    Path::Header(name) => Cow::Borrowed(ctx.email().header(name)?),
                    Path::Sum(lists) => match filters.next() {
                        Some(Filter::Join(sep)) => Cow::Owned(join_addresses(ctx, lists, sep)?),
                        _ => return None,
                    },
                    Path::Name(name, attr) => match filters.as_slice().first() {
                        Some(Filter::Join(sep)) if attr.is_none() => {
                            filters.next();
                            Cow::Owned(join_addresses(ctx, std::slice::from_ref(name), sep)?)
                        }
                        _ => match ctx.text_of(name, attr.as_deref()) {
                            Some(text) => Cow::Borrowed(text),
                            None if attr.is_none() && filters.as_slice().is_empty() => {
                                Cow::Owned(integer_field(ctx, name)?.to_string())
                            }
                            None => return None,
                        },
                    },
                };
                for filter in filters {
                    value = Cow::Owned(apply(filter, &value)?);
                }
                out.push_str(&value);
            }
        }
    }
    Some(out)
}

/// What a text filter makes of `value`; `None` when the engine must say.
fn apply(filter: &Filter, value: &str) -> Option<String> {
    Some(match filter {
        Filter::Lower => value.to_lowercase(),
        Filter::Upper => value.to_uppercase(),
        Filter::Trim => value.trim().to_string(),
        Filter::Title => title(value)?,
        Filter::Replace(from, to) => value.replace(from.as_str(), to),
        // `join` of a text joins its characters: leave that to the engine.
        Filter::Join(_) => return None,
    })
}

/// The template engine's `title`: the first letter of every word upper-cased, the others
/// lower-cased. `None` for a text with a capital sigma, whose lower case depends on the rest
/// of its word (the engine handles that).
fn title(value: &str) -> Option<String> {
    fn is_word_separator(c: char) -> bool {
        matches!(c, '-' | '(' | '{' | '[' | '<') || c.is_whitespace()
    }
    if value.contains('\u{3a3}') {
        return None;
    }
    let mut out = String::with_capacity(value.len());
    let mut capitalize = true;
    for c in value.chars() {
        if is_word_separator(c) {
            out.push(c);
            capitalize = true;
        } else if capitalize {
            if c.is_ascii() {
                out.push(c.to_ascii_uppercase());
            } else {
                out.extend(c.to_uppercase());
            }
            capitalize = false;
        } else if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    Some(out)
}

/// The addresses of the lists `names` (each `to`, `cc` or `reply_to`), one list after the
/// other, joined (each address prints as its bare address).
fn join_addresses(ctx: &Context<'_>, names: &[String], sep: &str) -> Option<String> {
    let email = ctx.email();
    let mut out = String::new();
    let mut first = true;
    for name in names {
        let list = match name.as_str() {
            "to" => &email.to,
            "cc" => &email.cc,
            "reply_to" => &email.reply_to,
            _ => return None,
        };
        for address in list {
            if !first {
                out.push_str(sep);
            }
            first = false;
            out.push_str(&address.address);
        }
    }
    Some(out)
}

/// The integer a field holds (not a built-in name), if it holds one.
fn integer_field(ctx: &Context<'_>, name: &str) -> Option<i128> {
    if RESERVED.contains(&name) {
        return None;
    }
    match ctx.fields().get(name)? {
        Json::Number(n) => n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)),
        _ => None,
    }
}

/// A plain value an expression works on.
enum Plain<'a> {
    Text(&'a str),
    Int(i128),
}

/// Built-in names whose value is a plain text (`from` prints as one but is an object).
const TEXT_BUILTINS: &[&str] = &["subject", "date", "message_id", "text", "html", "rule"];

fn plain<'a>(operand: &'a Operand, ctx: &'a Context<'_>) -> Option<Plain<'a>> {
    match operand {
        Operand::Text(t) => Some(Plain::Text(t)),
        Operand::Name(name) if RESERVED.contains(&name.as_str()) && !TEXT_BUILTINS.contains(&name.as_str()) => None,
        Operand::Name(name) => match integer_field(ctx, name) {
            Some(n) => Some(Plain::Int(n)),
            None => ctx.text_of(name, None).map(Plain::Text),
        },
    }
}

/// The value of `expr`, or `None` when the engine must evaluate it. `is_global` tells whether
/// a name is one of the engine's global functions (which an undefined field name would reach).
pub(crate) fn evaluate(expr: &Expr, ctx: &Context<'_>, is_global: impl Fn(&str) -> bool) -> Option<Json> {
    match expr {
        Expr::Convert { name, filters, to, if_defined } => match ctx.fields().get(name) {
            None if *if_defined && !RESERVED.contains(&name.as_str()) && !is_global(name) => Some(Json::Null),
            // The rules' `int` and `float` filters turn none into none.
            Some(Json::Null) if filters.is_empty() && *to != Conversion::Text => Some(Json::Null),
            Some(Json::String(s)) => {
                let mut value = std::borrow::Cow::Borrowed(s.as_str());
                for filter in filters {
                    value = std::borrow::Cow::Owned(apply(filter, &value)?);
                }
                match to {
                    Conversion::Text => Some(Json::String(value.into_owned())),
                    Conversion::Int => parse_int(&value).map(Json::from),
                    Conversion::Float => value.parse::<f64>().ok().map(Json::from),
                }
            }
            _ => None,
        },
        Expr::Compare { left, right, equal } => {
            let same = match (plain(left, ctx)?, plain(right, ctx)?) {
                (Plain::Text(a), Plain::Text(b)) => a == b,
                (Plain::Int(a), Plain::Int(b)) => a == b,
                _ => return None,
            };
            Some(Json::Bool(same == *equal))
        }
    }
}

/// What the `int` filter makes of a decimal integer such as `-42` or `+7` (at most 18
/// digits); `None` for anything else, which the engine converts (or refuses).
fn parse_int(s: &str) -> Option<i64> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_recognised_and_others_are_not() {
        assert_eq!(
            template_parts("{{ a | lower }}-{{ headers['X-Job'] }}{{ to|join(', ') }}"),
            Some(vec![
                Part::Value(Path::Name("a".into(), None), vec![Filter::Lower]),
                Part::Text("-".into()),
                Part::Value(Path::Header("X-Job".into()), vec![]),
                Part::Value(Path::Name("to".into(), None), vec![Filter::Join(", ".into())]),
            ])
        );
        for t in [
            "{{ a | capitalize }}",
            "{{ a | replace('x', 'yy') }}",
            "{{ a | replace('x') }}",
            "{{ a | lower(1) }}",
            "{{ a[0] }}",
            "{{ a.b.c }}",
            "{{ 'x' }}",
            "{{ none }}",
            "{{ a ~ b }}",
            "{{ headers['a\\'b'] }}",
            "{%- if a %}",
            "{{- a }}",
            "{{ a }}\n",
        ] {
            assert_eq!(template_parts(t), None, "{t}");
        }
        assert_eq!(
            expression("n|int"),
            Some(Expr::Convert { name: "n".into(), filters: vec![], to: Conversion::Int, if_defined: false })
        );
        assert_eq!(
            expression("n | float if n is defined else none"),
            Some(Expr::Convert { name: "n".into(), filters: vec![], to: Conversion::Float, if_defined: true })
        );
        assert_eq!(
            expression("n | replace('.', '') | replace(',', '.') | float"),
            Some(Expr::Convert {
                name: "n".into(),
                filters: vec![Filter::Replace(".".into(), "".into()), Filter::Replace(",".into(), ".".into())],
                to: Conversion::Float,
                if_defined: false
            })
        );
        assert_eq!(
            expression("a != \"x\""),
            Some(Expr::Compare { left: Operand::Name("a".into()), right: Operand::Text("x".into()), equal: false })
        );
        for e in [
            "n | int(0)",
            "n | int if m is defined else none",
            "(n | int)",
            "a == 1",
            "a == b == c",
            "a > b",
            "a in ['x']",
            "true == a",
            "a | int | string",
            "a",
            "a | int | lower",
            "a | join(',')",
            "a | replace('a', 'bc') | int",
        ] {
            assert_eq!(expression(e), None, "{e}");
        }
    }

    #[test]
    fn integers_as_the_int_filter_reads_them() {
        assert_eq!(parse_int("42"), Some(42));
        assert_eq!(parse_int("-007"), Some(-7));
        assert_eq!(parse_int("+7"), Some(7));
        for s in ["", "-", "+-1", "--1", " 1", "1 ", "1.5", "1e3", "0x10", "１", "1234567890123456789"] {
            assert_eq!(parse_int(s), None, "{s:?}");
        }
    }
}

//! The template side of rules: a sandboxed minijinja environment holding every compiled
//! template and expression of a rule set, and the context a message offers to them.
//!
//! Names a template sees: the rule's fields as top-level names, and the built-ins listed in
//! [`RESERVED`]. `from` is an address object that prints as the bare address and has
//! `.address` and `.name`; `to`, `cc` and `reply_to` are lists of them; `headers` is a map
//! looked up case-insensitively (`headers["x-job-id"]`).

use super::Spec;
use crate::model::{Address, Email, Envelope};
use minijinja::value::{Enumerator, Kwargs, Object, Serde, Value};
use minijinja::{AutoEscape, Environment, State, UndefinedBehavior};
use serde_json::{Map, Value as Json};
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Names the context provides; a field may not use one of them.
pub(crate) const RESERVED: &[&str] = &[
    "from",
    "to",
    "cc",
    "reply_to",
    "subject",
    "date",
    "message_id",
    "headers",
    "text",
    "html",
    "attachments",
    "envelope",
    "rule",
    "fields",
    "links",
];

/// Instructions one evaluation may spend: generous for real templates, a stop for runaways.
const FUEL: u64 = 200_000;

/// The name under which an expression's value is captured.
const RESULT_VAR: &str = "__mailhook_value";

/// Every compiled template of a rule set, each under its own name.
pub(crate) struct Templates {
    env: Environment<'static>,
}

impl Templates {
    pub(crate) fn new() -> Templates {
        let mut env = Environment::new();
        // Sandbox: no loader is set, so nothing can be read from disk; no functions touch the
        // network; fuel bounds the work of one evaluation.
        env.set_fuel(Some(FUEL));
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // A field that was not extracted converts to none (JSON null), not to 0: an absent
        // value must not look like a real zero in the payload.
        env.add_filter(
            "int",
            |state: &State, value: &Value, default: Option<Value>, base: Option<u32>, kwargs: Kwargs| {
                if value.is_undefined() || value.is_none() {
                    return Ok(default.or(kwargs.get::<Option<Value>>("default")?).unwrap_or(Value::from(())));
                }
                minijinja::filters::int(state, value, default, base, kwargs)
            },
        );
        env.add_filter("float", |state: &State, value: &Value, default: Option<Value>, kwargs: Kwargs| {
            if value.is_undefined() || value.is_none() {
                return Ok(default.or(kwargs.get::<Option<Value>>("default")?).unwrap_or(Value::from(())));
            }
            minijinja::filters::float(state, value, default, kwargs)
        });
        Templates { env }
    }

    /// Compiles a string template under `name`.
    pub(crate) fn add_template(&mut self, name: &str, source: &str) -> Result<(), String> {
        self.env.add_template_owned(name.to_string(), source.to_string()).map_err(|e| describe(&e))
    }

    /// Compiles an expression under `name`. The expression is first checked on its own (so
    /// that it is one expression and nothing more), then kept as a `{% set %}` template whose
    /// captured state yields the typed value.
    pub(crate) fn add_expr(&mut self, name: &str, expr: &str) -> Result<(), String> {
        self.env.compile_expression(expr).map_err(|e| describe(&e))?;
        let source = format!("{{% set {RESULT_VAR} = ({expr}\n) %}}");
        self.env.add_template_owned(name.to_string(), source).map_err(|e| describe(&e))
    }

    pub(crate) fn eval(&self, spec: &Spec, ctx: &Context<'_>) -> Result<Json, String> {
        match spec {
            Spec::Literal(v) => Ok(v.clone()),
            Spec::Template(name) => {
                let t = self.env.get_template(name).map_err(|e| describe(&e))?;
                t.render(ctx.value()).map(Json::String).map_err(|e| describe(&e))
            }
            Spec::Expr(name) => {
                let t = self.env.get_template(name).map_err(|e| describe(&e))?;
                let captured = t.render_captured(ctx.value()).map_err(|e| describe(&e))?;
                to_json(&captured.state().lookup(RESULT_VAR).unwrap_or(Value::UNDEFINED))
            }
            Spec::Array(items) => {
                items.iter().map(|s| self.eval(s, ctx)).collect::<Result<Vec<_>, _>>().map(Json::Array)
            }
            Spec::Object(entries) => {
                let mut map = Map::new();
                for (k, s) in entries {
                    map.insert(k.clone(), self.eval(s, ctx)?);
                }
                Ok(Json::Object(map))
            }
        }
    }
}

fn to_json(value: &Value) -> Result<Json, String> {
    if value.is_undefined() || value.is_none() {
        return Ok(Json::Null);
    }
    serde_json::to_value(value).map_err(|e| format!("result cannot be turned into JSON: {e}"))
}

/// One line describing a minijinja error, without the template's internal name.
pub(crate) fn describe(e: &minijinja::Error) -> String {
    let mut s = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line()
        && line > 1
    {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

/// What templates of one message can see, and the fields of the rule being applied (in the
/// order they were first set, as they go into the payload).
pub(crate) struct Context<'a> {
    email: &'a Email,
    envelope: &'a Envelope,
    rule: &'a str,
    /// The built-in values, made when a template is first evaluated.
    base: OnceCell<Arc<BTreeMap<&'static str, Value>>>,
    fields: Map<String, Json>,
    /// The same fields as template values.
    values: Arc<BTreeMap<String, Value>>,
    /// Signed links, when `[web] public_url` is set.
    links: Option<&'a crate::links::Links>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(email: &'a Email, envelope: &'a Envelope, rule: &'a str, fields: Map<String, Json>) -> Self {
        let values = Arc::new(fields.iter().map(|(k, v)| (k.clone(), Value::from(Serde(v)))).collect());
        Context { email, envelope, rule, base: OnceCell::new(), fields, values, links: None }
    }

    /// Lets templates see the message's signed links as `links`.
    pub(crate) fn with_links(mut self, links: Option<&'a crate::links::Links>) -> Context<'a> {
        self.links = links;
        self
    }

    pub(crate) fn fields(&self) -> &Map<String, Json> {
        &self.fields
    }

    /// The fields, with everything else the context holds let go.
    pub(crate) fn into_fields(self) -> Map<String, Json> {
        self.fields
    }

    /// Adds or replaces a field (a new name goes last, a known one keeps its place); later
    /// evaluations see it.
    pub(crate) fn set(&mut self, key: &str, value: Json) {
        Arc::make_mut(&mut self.values).insert(key.to_string(), Value::from(Serde(&value)));
        self.fields.insert(key.to_string(), value);
    }

    /// The context object a template is rendered with.
    fn value(&self) -> Value {
        let base = self.base.get_or_init(|| {
            let mut base = base_values(self.email, self.envelope, self.rule);
            base.insert(
                "links",
                Value::from(Serde(&crate::links::template_json(self.links, &self.envelope.id, self.email))),
            );
            Arc::new(base)
        });
        Value::from_object(ContextObject { base: base.clone(), fields: self.values.clone() })
    }
}

/// The values of the built-in names (`fields` is served by the context object itself).
fn base_values(email: &Email, envelope: &Envelope, rule: &str) -> BTreeMap<&'static str, Value> {
    let addresses = |list: &[Address]| Value::from(list.iter().map(AddressObject::value).collect::<Vec<_>>());
    let headers = email.headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect();
    BTreeMap::from([
        ("from", AddressObject::value(email.from.first().unwrap_or(&Address::default()))),
        ("to", addresses(&email.to)),
        ("cc", addresses(&email.cc)),
        ("reply_to", addresses(&email.reply_to)),
        ("subject", Value::from(email.subject.as_str())),
        ("date", Value::from(email.date.as_str())),
        ("message_id", Value::from(email.message_id.as_str())),
        ("text", Value::from(email.text.as_str())),
        ("html", Value::from(email.html.as_str())),
        ("headers", Value::from_object(HeadersObject(headers))),
        ("attachments", Value::from(Serde(&email.attachments))),
        ("envelope", envelope_value(envelope)),
        ("rule", Value::from(rule)),
    ])
}

fn envelope_value(envelope: &Envelope) -> Value {
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("id", Value::from(envelope.id.as_str()));
    m.insert("source", Value::from(envelope.source.to_string()));
    m.insert("mail_from", Value::from(envelope.mail_from.clone().unwrap_or_default()));
    m.insert("recipients", Value::from(Serde(&envelope.recipients)));
    m.insert("received_at", Value::from(envelope.received_at.as_str()));
    m.insert("client", Value::from(envelope.client.clone().unwrap_or_default()));
    m.insert("helo", Value::from(envelope.helo.clone().unwrap_or_default()));
    m.insert("tls", Value::from(envelope.tls));
    m.insert("auth_user", Value::from(envelope.auth_user.clone().unwrap_or_default()));
    Value::from(m)
}

#[derive(Debug)]
struct ContextObject {
    base: Arc<BTreeMap<&'static str, Value>>,
    fields: Arc<BTreeMap<String, Value>>,
}

impl Object for ContextObject {
    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        match key {
            "fields" => Some(Value::from((*self.fields).clone())),
            _ => self.base.get(key).or_else(|| self.fields.get(key)).cloned(),
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        key.as_str().and_then(|k| self.get_value_by_str(k))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut keys: Vec<Value> = self.base.keys().map(|k| Value::from(*k)).collect();
        keys.push(Value::from("fields"));
        keys.extend(self.fields.keys().map(|k| Value::from(k.as_str())));
        Enumerator::Values(keys)
    }
}

/// An address: prints as the bare address, with `.address` and `.name`.
#[derive(Debug)]
struct AddressObject {
    address: String,
    name: String,
}

impl AddressObject {
    fn value(a: &Address) -> Value {
        Value::from_object(AddressObject { address: a.address.clone(), name: a.name.clone() })
    }
}

impl Object for AddressObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "address" => Some(Value::from(self.address.as_str())),
            "name" => Some(Value::from(self.name.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["address", "name"])
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

/// Headers by name, case-insensitively; the first value of a repeated header.
#[derive(Debug)]
struct HeadersObject(Vec<(String, String)>);

impl Object for HeadersObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0.iter().find(|(name, _)| name.eq_ignore_ascii_case(key)).map(|(_, v)| Value::from(v.as_str()))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut seen: Vec<Value> = Vec::new();
        for (name, _) in &self.0 {
            if !seen.iter().any(|s| s.as_str().is_some_and(|s| s.eq_ignore_ascii_case(name))) {
                seen.push(Value::from(name.as_str()));
            }
        }
        Enumerator::Values(seen)
    }
}

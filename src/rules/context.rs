//! The template side of rules: a sandboxed minijinja environment holding every compiled
//! template and expression of a rule set, and the context a message offers to them.
//!
//! Names a template sees: the rule's fields as top-level names, and the built-ins listed in
//! [`RESERVED`]. `from` is an address object that prints as the bare address and has
//! `.address` and `.name`; `to`, `cc` and `reply_to` are lists of them; `headers` is a map
//! looked up case-insensitively (`headers["x-job-id"]`).

use super::{Spec, fast};
use crate::model::{Address, Email, Envelope, json};
use minijinja::value::{Enumerator, Kwargs, Object, Value};
use minijinja::{AutoEscape, Environment, State, UndefinedBehavior};
use serde_json::{Map, Value as Json};
use std::cell::{OnceCell, RefCell};
use std::collections::{BTreeMap, HashMap};
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

/// Which of the [`RESERVED`] names a rule's templates refer to (bit `i` for `RESERVED[i]`).
/// Only those are built into a message's context: most rules never look at the text, the HTML
/// or the headers, and copying them for every message would cost more than the rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Uses(u32);

impl Uses {
    /// Everything (for callers that cannot tell).
    pub(crate) const ALL: Uses = Uses(u32::MAX);

    fn has(self, name: &str) -> bool {
        RESERVED.iter().position(|r| *r == name).is_some_and(|i| self.0 & (1 << i) != 0)
    }

    pub(crate) fn union(self, other: Uses) -> Uses {
        Uses(self.0 | other.0)
    }

    /// The names of `self` that `other` does not have.
    fn without(self, other: Uses) -> Uses {
        Uses(self.0 & !other.0)
    }
}

/// Instructions one evaluation may spend: generous for real templates, a stop for runaways.
const FUEL: u64 = 200_000;

/// The name under which an expression's value is captured.
const RESULT_VAR: &str = "__mailhook_value";

/// Every compiled template of a rule set.
pub(crate) struct Templates {
    env: Environment<'static>,
    /// The names each template refers to, so that a message's context gets only those.
    uses: HashMap<String, Uses>,
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
        Templates { env, uses: HashMap::new() }
    }

    /// Compiles a string template under `name`.
    pub(crate) fn add_template(&mut self, name: &str, source: &str) -> Result<(), String> {
        self.env.add_template_owned(name.to_string(), source.to_string()).map_err(|e| describe(&e))?;
        self.uses.insert(name.to_string(), self.uses(name));
        Ok(())
    }

    /// Compiles an expression under `name`. The expression is first checked on its own (so
    /// that it is one expression and nothing more), then kept as a `{% set %}` template whose
    /// captured state yields the typed value.
    pub(crate) fn add_expr(&mut self, name: &str, expr: &str) -> Result<(), String> {
        self.env.compile_expression(expr).map_err(|e| describe(&e))?;
        let source = format!("{{% set {RESULT_VAR} = ({expr}\n) %}}");
        self.env.add_template_owned(name.to_string(), source).map_err(|e| describe(&e))?;
        self.uses.insert(name.to_string(), self.uses(name));
        Ok(())
    }

    /// The reserved names the compiled template or expression `name` refers to.
    fn uses(&self, name: &str) -> Uses {
        let Ok(t) = self.env.get_template(name) else { return Uses::ALL };
        let names = t.undeclared_variables(false);
        Uses(RESERVED.iter().enumerate().filter(|(_, r)| names.contains(**r)).fold(0, |acc, (i, _)| acc | (1 << i)))
    }

    pub(crate) fn eval(&self, spec: &Spec, ctx: &Context<'_>) -> Result<Json, String> {
        match spec {
            Spec::Literal(v) => Ok(v.clone()),
            Spec::Field { name, template } => match ctx.text_of(name, None) {
                // `{{ name }}` of a text field, or of a built-in name whose value is text (such
                // as `rule` or `subject`), renders the text itself: skip the template.
                Some(text) => Ok(Json::String(text.to_string())),
                None => self.render(template, ctx),
            },
            Spec::Simple { parts, template } => match fast::render(parts, ctx) {
                Some(text) => Ok(Json::String(text)),
                None => self.render(template, ctx),
            },
            Spec::Template(name) => self.render(name, ctx),
            Spec::Expr(name) => self.eval_expr(name, ctx),
            Spec::FastExpr { expr, template } => {
                match fast::evaluate(expr, ctx, |name| self.env.globals().any(|(g, _)| g == name)) {
                    Some(value) => Ok(value),
                    None => self.eval_expr(template, ctx),
                }
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

    fn eval_expr(&self, name: &str, ctx: &Context<'_>) -> Result<Json, String> {
        let t = self.env.get_template(name).map_err(|e| describe(&e))?;
        let captured = t.render_captured(ctx.value(self.uses_of(name))).map_err(|e| describe(&e))?;
        let value = captured.state().lookup(RESULT_VAR).unwrap_or(Value::UNDEFINED);
        to_json(&value)
    }

    fn render(&self, name: &str, ctx: &Context<'_>) -> Result<Json, String> {
        let t = self.env.get_template(name).map_err(|e| describe(&e))?;
        t.render(ctx.value(self.uses_of(name))).map(Json::String).map_err(|e| describe(&e))
    }

    fn uses_of(&self, name: &str) -> Uses {
        self.uses.get(name).copied().unwrap_or(Uses::ALL)
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

/// A rule's fields while it is applied, in the order they were first set.
///
/// A handful of names, looked up by templates again and again: a list searched in order costs
/// less than hashing each name. The names are the rule's own (group names, `[rule.fields]`
/// keys), borrowed, not copied for every message.
#[derive(Debug, Default)]
pub(crate) struct Fields<'k>(Vec<(&'k str, Json)>);

impl<'k> Fields<'k> {
    pub(crate) fn with_capacity(n: usize) -> Fields<'k> {
        Fields(Vec::with_capacity(n))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Json> {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// Sets a field: a new name goes last, a known one keeps its place.
    pub(crate) fn insert(&mut self, name: &'k str, value: Json) {
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some((_, slot)) => *slot = value,
            None => self.0.push((name, value)),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'k str, &Json)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }
}

impl Fields<'_> {
    /// About the length of their JSON text (a string's text counts, any other value 24).
    pub(crate) fn size_hint(&self) -> usize {
        self.iter().map(|(name, value)| name.len() + value.as_str().map_or(24, str::len) + 6).sum()
    }

    /// Appends them as a JSON object, in order. `plain_names`: the names are field names
    /// (letters, digits and `_`, as loading checks), with nothing to escape; else they are
    /// escaped (the keys of a `[rule.payload]`).
    pub(crate) fn write(&self, out: &mut String, plain_names: bool) {
        let mut object = json::Object::new(out);
        for (name, value) in self.iter() {
            let out = if plain_names { object.name(name) } else { object.key(name) };
            json::push_value(out, value);
        }
        object.end();
    }
}

/// What templates of one message can see, and the fields of the rule being applied.
///
/// Cheap to create: the values derived from the email, and the fields as template values, are
/// built when an evaluation needs the template engine, and then only the names its template
/// refers to; the fields are shared with each evaluation (copy on write), not copied.
pub(crate) struct Context<'a> {
    email: &'a Email,
    envelope: &'a Envelope,
    rule: &'a str,
    /// The built-in values made so far, and which names they are.
    base: RefCell<(Uses, Arc<BTreeMap<&'static str, Value>>)>,
    /// The fields as they go into the payload.
    fields: Fields<'a>,
    /// The same fields as template values, once the engine needs them.
    values: OnceCell<Arc<BTreeMap<String, Value>>>,
    /// Signed links, when `[web] public_url` is set.
    links: Option<&'a crate::links::Links>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(email: &'a Email, envelope: &'a Envelope, rule: &'a str, fields: Fields<'a>) -> Context<'a> {
        Context { email, envelope, rule, base: RefCell::default(), fields, values: OnceCell::new(), links: None }
    }

    /// Lets templates see the message's signed links as `links`.
    pub(crate) fn with_links(mut self, links: Option<&'a crate::links::Links>) -> Context<'a> {
        self.links = links;
        self
    }

    pub(crate) fn email(&self) -> &Email {
        self.email
    }

    pub(crate) fn fields(&self) -> &Fields<'a> {
        &self.fields
    }

    pub(crate) fn into_fields(self) -> Fields<'a> {
        self.fields
    }

    /// Adds or replaces a field; later evaluations see it.
    pub(crate) fn set(&mut self, key: &'a str, value: Json) {
        if let Some(values) = self.values.get_mut() {
            Arc::make_mut(values).insert(key.to_string(), template_value(&value));
        }
        self.fields.insert(key, value);
    }

    /// What `{{ name }}` or `{{ name.attr }}` renders to, when that is plain text known
    /// without the template engine; `None` when the engine must decide (numbers, lists,
    /// undefined names, unknown attributes).
    pub(crate) fn text_of(&self, name: &str, attr: Option<&str>) -> Option<&str> {
        let email = self.email;
        let envelope = self.envelope;
        Some(match (name, attr) {
            ("subject", None) => &email.subject,
            ("date", None) => &email.date,
            ("message_id", None) => &email.message_id,
            ("text", None) => &email.text,
            ("html", None) => &email.html,
            ("rule", None) => self.rule,
            ("from", None | Some("address")) => email.from.first().map_or("", |a| a.address.as_str()),
            ("from", Some("name")) => email.from.first().map_or("", |a| a.name.as_str()),
            ("envelope", Some("id")) => &envelope.id,
            ("envelope", Some("received_at")) => &envelope.received_at,
            ("envelope", Some("mail_from")) => envelope.mail_from.as_deref().unwrap_or(""),
            ("envelope", Some("client")) => envelope.client.as_deref().unwrap_or(""),
            ("envelope", Some("helo")) => envelope.helo.as_deref().unwrap_or(""),
            ("envelope", Some("auth_user")) => envelope.auth_user.as_deref().unwrap_or(""),
            (_, Some(_)) => return None,
            (field, None) if !RESERVED.contains(&field) => match self.fields.get(field)? {
                Json::String(s) => s,
                _ => return None,
            },
            _ => return None,
        })
    }

    /// The context object for a template that refers to the built-in names `uses`.
    fn value(&self, uses: Uses) -> Value {
        let mut base = self.base.borrow_mut();
        let missing = uses.without(base.0);
        if missing != Uses::default() {
            add_base_values(Arc::make_mut(&mut base.1), self.email, self.envelope, self.rule, missing);
            if missing.has("links") {
                Arc::make_mut(&mut base.1).insert("links", links_value(self.links, self.email, self.envelope));
            }
            base.0 = base.0.union(missing);
        }
        let base = base.1.clone();
        let values = self
            .values
            .get_or_init(|| Arc::new(self.fields.iter().map(|(k, v)| (k.to_string(), template_value(v))).collect()));
        Value::from_object(ContextObject { base, fields: values.clone() })
    }
}

/// A field as the template engine sees it.
fn template_value(value: &Json) -> Value {
    match value {
        Json::String(s) => Value::from(s.as_str()),
        other => Value::from(minijinja::value::Serde(other)),
    }
}

/// Adds the values of the built-in names `uses` to `base`.
fn add_base_values(
    base: &mut BTreeMap<&'static str, Value>,
    email: &Email,
    envelope: &Envelope,
    rule: &str,
    uses: Uses,
) {
    let addresses = |list: &[Address]| Value::from(list.iter().map(AddressObject::value).collect::<Vec<_>>());
    for &name in RESERVED {
        if !uses.has(name) {
            continue;
        }
        let value = match name {
            "from" => AddressObject::value(email.from.first().unwrap_or(&Address::default())),
            "to" => addresses(&email.to),
            "cc" => addresses(&email.cc),
            "reply_to" => addresses(&email.reply_to),
            "subject" => Value::from(email.subject.as_str()),
            "date" => Value::from(email.date.as_str()),
            "message_id" => Value::from(email.message_id.as_str()),
            "text" => Value::from(email.text.as_str()),
            "html" => Value::from(email.html.as_str()),
            "headers" => Value::from_object(HeadersObject(
                email.headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect(),
            )),
            "attachments" => Value::from(minijinja::value::Serde(&email.attachments)),
            "envelope" => envelope_value(envelope),
            "rule" => Value::from(rule),
            _ => continue, // `fields` is served by the context object itself
        };
        base.insert(name, value);
    }
}

/// `links`: `url`, `attachment_urls` (comma-joined) and `attachments` (`{name, url}` each);
/// empty strings and an empty list without `[web] public_url`.
fn links_value(links: Option<&crate::links::Links>, email: &Email, envelope: &Envelope) -> Value {
    let (url, attachments) = match links {
        Some(l) => (l.message(&envelope.id), l.attachments(&envelope.id, email)),
        None => (String::new(), Vec::new()),
    };
    let joined = attachments.iter().map(|(_, u)| u.as_str()).collect::<Vec<_>>().join(", ");
    let list: Vec<Value> = attachments
        .into_iter()
        .map(|(name, url)| {
            let mut m: BTreeMap<&str, Value> = BTreeMap::new();
            m.insert("name", Value::from(name));
            m.insert("url", Value::from(url));
            Value::from(m)
        })
        .collect();
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("url", Value::from(url));
    m.insert("attachment_urls", Value::from(joined));
    m.insert("attachments", Value::from(list));
    Value::from(m)
}

fn envelope_value(envelope: &Envelope) -> Value {
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("id", Value::from(envelope.id.as_str()));
    m.insert("source", Value::from(envelope.source.to_string()));
    m.insert("mail_from", Value::from(envelope.mail_from.clone().unwrap_or_default()));
    m.insert("recipients", Value::from(minijinja::value::Serde(&envelope.recipients)));
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

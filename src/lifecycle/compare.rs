//! compare: what changes for one message between two judgements of it (the live rules' and
//! another set's). Pure.
//!
//! A message falls in exactly one [`Kind`], tried in this order: newly unmatched (a rule
//! matched, none does now), newly matched, changed rule, newly dead (the same rule, and the
//! message is now a dead letter where it was not), changed fields (the same rule, and the
//! payload, the destinations or the action differ). Nothing else differs: unchanged.
//!
//! The field-level diff flattens both payloads (`fields.order_id`, `subject`, ...) and lists
//! every path whose value differs, leaving out `id`, `receivedAt` and `rule` (the first two do
//! not depend on the rules; the rule has its own line).

use crate::model::{Action, Outcome};
use serde::Serialize;
use serde_json::{Map, Value as Json};

/// How a message's judgement changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    NewlyUnmatched,
    NewlyMatched,
    ChangedRule,
    NewlyDead,
    ChangedFields,
}

impl Kind {
    pub const ALL: [Kind; 5] =
        [Kind::ChangedRule, Kind::NewlyMatched, Kind::NewlyUnmatched, Kind::NewlyDead, Kind::ChangedFields];

    /// The name used in reports and metric labels (`newly_unmatched`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Kind::NewlyUnmatched => "newly_unmatched",
            Kind::NewlyMatched => "newly_matched",
            Kind::ChangedRule => "changed_rule",
            Kind::NewlyDead => "newly_dead",
            Kind::ChangedFields => "changed_fields",
        }
    }

    /// How a person reads it.
    pub fn words(self) -> &'static str {
        match self {
            Kind::NewlyUnmatched => "newly unmatched",
            Kind::NewlyMatched => "newly matched",
            Kind::ChangedRule => "changed rule",
            Kind::NewlyDead => "newly dead",
            Kind::ChangedFields => "changed fields",
        }
    }
}

/// One line of a diff: `path: before → after`. `None` is a value that is not there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Json>,
}

impl Change {
    /// `fields.order_id: 4711 → (missing)`; `rule: ups → (none)`.
    pub fn line(&self) -> String {
        let absent = if self.path == "rule" { "(none)" } else { "(missing)" };
        let (mut b, mut a) = (show(self.before.as_ref(), absent), show(self.after.as_ref(), absent));
        if a == b {
            // Only the type differs ("4711" and 4711): show both as JSON.
            b = self.before.as_ref().map_or(absent.to_string(), |v| v.to_string());
            a = self.after.as_ref().map_or(absent.to_string(), |v| v.to_string());
        }
        format!("{}: {} → {}", self.path, b, a)
    }
}

/// Longest value shown in a diff line, in characters.
const SHOWN: usize = 80;

fn show(v: Option<&Json>, absent: &str) -> String {
    let text = match v {
        None => return absent.to_string(),
        Some(Json::String(s)) if !s.is_empty() && s.trim() == s && !s.contains(['\n', '\r']) => s.clone(),
        Some(v) => v.to_string(),
    };
    if text.chars().count() > SHOWN {
        let cut: String = text.chars().take(SHOWN).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// The difference between `before` (the live rules') and `after`, or `None` when the two
/// judgements are the same.
pub fn compare(before: &Outcome, after: &Outcome) -> Option<(Kind, Vec<Change>)> {
    let mut changes = Vec::new();
    if before.rule != after.rule {
        changes.push(Change {
            path: "rule".into(),
            before: before.rule.clone().map(Json::String),
            after: after.rule.clone().map(Json::String),
        });
    }
    let (ab, aa) = (action(&before.action), action(&after.action));
    if ab != aa {
        changes.push(Change { path: "action".into(), before: Some(Json::String(ab)), after: Some(Json::String(aa)) });
    }
    let dropped = matches!(before.action, Action::Drop) || matches!(after.action, Action::Drop);
    if !dropped && before.payload != after.payload {
        let (pb, pa) = (before.payload.to_map().unwrap_or_default(), after.payload.to_map().unwrap_or_default());
        let (mut fb, mut fa) = (Vec::new(), Vec::new());
        flatten("", &pb, &mut fb);
        flatten("", &pa, &mut fa);
        for (path, v) in &fb {
            let other = fa.iter().find(|(p, _)| p == path).map(|(_, v)| v);
            if other != Some(v) {
                changes.push(Change {
                    path: path.clone(),
                    before: Some((*v).clone()),
                    after: other.map(|v| (*v).clone()),
                });
            }
        }
        for (path, v) in &fa {
            if !fb.iter().any(|(p, _)| p == path) {
                changes.push(Change { path: path.clone(), before: None, after: Some((*v).clone()) });
            }
        }
    }
    if changes.is_empty() {
        return None;
    }
    let dead = |o: &Outcome| matches!(o.action, Action::Dead { .. });
    let kind = match (&before.rule, &after.rule) {
        (Some(_), None) => Kind::NewlyUnmatched,
        (None, Some(_)) => Kind::NewlyMatched,
        (Some(b), Some(a)) if b != a => Kind::ChangedRule,
        _ if dead(after) && !dead(before) => Kind::NewlyDead,
        _ => Kind::ChangedFields,
    };
    Some((kind, changes))
}

/// Whether the change breaks mail that worked: a message a rule matched (and did not make a
/// dead letter) is now unmatched, or a dead letter.
pub fn breaks(before: &Outcome, after: &Outcome) -> bool {
    let dead = |o: &Outcome| matches!(o.action, Action::Dead { .. });
    before.rule.is_some() && !dead(before) && (after.rule.is_none() || dead(after))
}

/// `deliver to a, b`, `dead (no rule matched)`, `drop`.
fn action(a: &Action) -> String {
    match a {
        Action::Deliver { to } if to.is_empty() => "deliver to nobody".into(),
        Action::Deliver { to } => format!("deliver to {}", to.join(", ")),
        Action::Dead { reason } => format!("dead ({reason})"),
        Action::Drop => "drop".into(),
    }
}

/// Every leaf of `object` with its dotted path; arrays are leaves, an empty object has none. The keys that do not depend
/// on the rules (or have their own line) are left out at the top.
fn flatten<'a>(prefix: &str, object: &'a Map<String, Json>, out: &mut Vec<(String, &'a Json)>) {
    for (k, v) in object {
        if prefix.is_empty() && matches!(k.as_str(), "id" | "receivedAt" | "rule") {
            continue;
        }
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Json::Object(inner) => flatten(&path, inner, out),
            _ => out.push((path, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Payload;
    use serde_json::json;

    fn outcome(rule: Option<&str>, action: Action, payload: Json) -> Outcome {
        Outcome { rule: rule.map(String::from), action, payload: Payload::of(&payload) }
    }

    fn deliver(to: &str) -> Action {
        Action::Deliver { to: vec![to.to_string()] }
    }

    #[test]
    fn the_same_judgement_is_no_difference() {
        let o = outcome(Some("ups"), deliver("orders"), json!({"id": "a", "fields": {"n": "1"}}));
        assert_eq!(compare(&o, &o.clone()), None);
        let other_id = outcome(Some("ups"), deliver("orders"), json!({"id": "b", "fields": {"n": "1"}}));
        assert_eq!(compare(&o, &other_id), None, "ids are left out");
    }

    #[test]
    fn a_rule_that_no_longer_matches_is_newly_unmatched_with_each_field_missing() {
        let before = outcome(
            Some("ups-delivery-notice"),
            deliver("orders"),
            json!({"rule": "ups-delivery-notice", "subject": "S", "fields": {"order_id": "4711"}}),
        );
        let after = outcome(
            None,
            Action::Dead { reason: "no rule matched".into() },
            json!({"rule": null, "subject": "S", "fields": {}}),
        );
        let (kind, changes) = compare(&before, &after).unwrap();
        assert_eq!(kind, Kind::NewlyUnmatched);
        let lines: Vec<String> = changes.iter().map(Change::line).collect();
        assert_eq!(
            lines,
            [
                "rule: ups-delivery-notice → (none)",
                "action: deliver to orders → dead (no rule matched)",
                "fields.order_id: 4711 → (missing)",
            ]
        );
        assert!(breaks(&before, &after));
        assert!(!breaks(&after, &before));
    }

    #[test]
    fn kinds_are_told_apart() {
        let p = json!({"fields": {"a": "1"}});
        let ups = outcome(Some("ups"), deliver("orders"), p.clone());
        let dhl = outcome(Some("dhl"), deliver("orders"), p.clone());
        let none = outcome(None, Action::Dead { reason: "no rule matched".into() }, p.clone());
        let dead = outcome(Some("ups"), Action::Dead { reason: "required field a missing".into() }, p.clone());
        let other = outcome(Some("ups"), deliver("orders"), json!({"fields": {"a": 1}}));
        assert_eq!(compare(&ups, &dhl).unwrap().0, Kind::ChangedRule);
        assert_eq!(compare(&none, &ups).unwrap().0, Kind::NewlyMatched);
        assert_eq!(compare(&ups, &dead).unwrap().0, Kind::NewlyDead);
        assert!(breaks(&ups, &dead));
        let (kind, changes) = compare(&ups, &other).unwrap();
        assert_eq!(kind, Kind::ChangedFields);
        assert_eq!(changes[0].line(), r#"fields.a: "1" → 1"#, "a change of type shows as JSON");
        assert!(!breaks(&ups, &other));
    }
}

//! `LabelSelector` → the label-selector string of list/watch calls.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why a `LabelSelector` cannot become a selector string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions key {key:?}: operator {operator} needs at least one value")]
    MissingValues { key: String, operator: String },
    #[error("matchExpressions key {key:?}: operator {operator} takes no values")]
    UnexpectedValues { key: String, operator: String },
    #[error("matchExpressions key {key:?}: unknown operator {operator:?}")]
    UnknownOperator { key: String, operator: String },
    #[error("empty label key in the selector")]
    EmptyKey,
}

/// The selector string (`k=v,k2 in (a,b),!k3`) of a `LabelSelector`: `matchLabels` first (by
/// key), then `matchExpressions` in order, values of `in`/`notin` sorted. An empty selector
/// gives an empty string, which selects everything (Kubernetes semantics).
pub fn selector_string(selector: &LabelSelector) -> Result<String, SelectorError> {
    let mut parts = Vec::new();
    for (k, v) in selector.match_labels.iter().flatten() {
        if k.is_empty() {
            return Err(SelectorError::EmptyKey);
        }
        parts.push(format!("{k}={v}"));
    }
    for expr in selector.match_expressions.iter().flatten() {
        let key = &expr.key;
        if key.is_empty() {
            return Err(SelectorError::EmptyKey);
        }
        let mut values: Vec<&str> = expr.values.iter().flatten().map(String::as_str).collect();
        values.sort_unstable();
        values.dedup();
        let err_missing = || SelectorError::MissingValues {
            key: key.clone(),
            operator: expr.operator.clone(),
        };
        let err_unexpected = || SelectorError::UnexpectedValues {
            key: key.clone(),
            operator: expr.operator.clone(),
        };
        match expr.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    return Err(err_missing());
                }
                let op = if expr.operator == "In" { "in" } else { "notin" };
                parts.push(format!("{key} {op} ({})", values.join(",")));
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    return Err(err_unexpected());
                }
                if expr.operator == "Exists" {
                    parts.push(key.clone());
                } else {
                    parts.push(format!("!{key}"));
                }
            }
            other => {
                return Err(SelectorError::UnknownOperator {
                    key: key.clone(),
                    operator: other.to_string(),
                })
            }
        }
    }
    Ok(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use std::collections::BTreeMap;

    fn req(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_are_sorted_by_key() {
        let s = LabelSelector {
            match_labels: Some(BTreeMap::from([
                ("b".to_string(), "2".to_string()),
                (
                    "app.kubernetes.io/component".to_string(),
                    "tidb".to_string(),
                ),
            ])),
            match_expressions: None,
        };
        assert_eq!(
            selector_string(&s).unwrap(),
            "app.kubernetes.io/component=tidb,b=2"
        );
    }

    #[test]
    fn expressions_of_every_operator() {
        let s = LabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_string(), "tidb".to_string())])),
            match_expressions: Some(vec![
                req("zone", "In", Some(&["b", "a", "b"])),
                req("tier", "NotIn", Some(&["canary"])),
                req("ready", "Exists", None),
                req("legacy", "DoesNotExist", Some(&[])),
            ]),
        };
        assert_eq!(
            selector_string(&s).unwrap(),
            "app=tidb,zone in (a,b),tier notin (canary),ready,!legacy"
        );
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert_eq!(selector_string(&LabelSelector::default()).unwrap(), "");
    }

    #[test]
    fn invalid_expressions_are_errors() {
        let bad = |r| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![r]),
        };
        assert!(matches!(
            selector_string(&bad(req("a", "In", None))),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            selector_string(&bad(req("a", "Exists", Some(&["x"])))),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        assert!(matches!(
            selector_string(&bad(req("a", "Gt", Some(&["1"])))),
            Err(SelectorError::UnknownOperator { .. })
        ));
        assert_eq!(
            selector_string(&bad(req("", "Exists", None))),
            Err(SelectorError::EmptyKey)
        );
    }
}

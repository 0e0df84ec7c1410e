//! Box identifiers: 128 random bits in lowercase hex. Like Docker's ids, any unique prefix of an
//! id names the box, and the first 12 characters are the short form shown to people.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Length of a full id in hex characters.
pub const ID_LEN: usize = 32;
/// Length of the short form shown in tables.
pub const SHORT_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BoxId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid box id '{input}': expected {ID_LEN} lowercase hex characters")]
    Malformed { input: String },
    #[error("no box id starts with '{prefix}'")]
    NotFound { prefix: String },
    #[error("box id prefix '{prefix}' is ambiguous: it matches {matches} boxes")]
    Ambiguous { prefix: String, matches: usize },
    #[error("box id prefix must not be empty")]
    EmptyPrefix,
}

impl BoxId {
    /// A fresh random id.
    pub fn random() -> Self {
        let bytes: [u8; ID_LEN / 2] = rand::random();
        BoxId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Parses a full id (exactly 32 lowercase hex characters).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(BoxId(s.to_owned()))
        } else {
            Err(IdError::Malformed {
                input: s.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 12-character form used in tables.
    pub fn short(&self) -> &str {
        &self.0[..SHORT_LEN]
    }

    /// Finds the one id among `ids` that starts with `prefix`. A full id always matches itself
    /// even if it were (impossibly) a prefix of another.
    pub fn resolve_prefix<'a, I>(prefix: &str, ids: I) -> Result<&'a BoxId, IdError>
    where
        I: IntoIterator<Item = &'a BoxId>,
    {
        if prefix.is_empty() {
            return Err(IdError::EmptyPrefix);
        }
        let mut found: Option<&BoxId> = None;
        let mut matches = 0;
        for id in ids {
            if id.0 == prefix {
                return Ok(id);
            }
            if id.0.starts_with(prefix) {
                matches += 1;
                found = Some(id);
            }
        }
        match (matches, found) {
            (1, Some(id)) => Ok(id),
            (0, _) => Err(IdError::NotFound {
                prefix: prefix.to_owned(),
            }),
            _ => Err(IdError::Ambiguous {
                prefix: prefix.to_owned(),
                matches,
            }),
        }
    }
}

impl fmt::Display for BoxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for BoxId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        BoxId::parse(&s)
    }
}

impl From<BoxId> for String {
    fn from(id: BoxId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_well_formed_and_distinct() {
        let a = BoxId::random();
        let b = BoxId::random();
        assert_ne!(a, b);
        assert_eq!(BoxId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.short().len(), SHORT_LEN);
        assert!(a.as_str().starts_with(a.short()));
    }

    #[test]
    fn parse_rejects_bad_input_and_names_it() {
        for bad in ["", "abc", &"A".repeat(32), &"g".repeat(32), &"a".repeat(33)] {
            let err = BoxId::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn prefixes_resolve_uniquely_or_fail_clearly() {
        let ids: Vec<BoxId> = ["ab12", "ab34", "cd56"]
            .iter()
            .map(|p| BoxId(format!("{p}{}", "0".repeat(ID_LEN - 4))))
            .collect();
        assert_eq!(BoxId::resolve_prefix("c", &ids).unwrap(), &ids[2]);
        assert_eq!(BoxId::resolve_prefix("ab3", &ids).unwrap(), &ids[1]);
        assert_eq!(
            BoxId::resolve_prefix("ab", &ids).unwrap_err(),
            IdError::Ambiguous {
                prefix: "ab".into(),
                matches: 2
            }
        );
        assert!(matches!(
            BoxId::resolve_prefix("ff", &ids),
            Err(IdError::NotFound { .. })
        ));
        assert_eq!(
            BoxId::resolve_prefix("", &ids).unwrap_err(),
            IdError::EmptyPrefix
        );
        assert_eq!(
            BoxId::resolve_prefix(ids[0].as_str(), &ids).unwrap(),
            &ids[0]
        );
    }

    #[test]
    fn serde_round_trip_validates() {
        let id = BoxId::random();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<BoxId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<BoxId>("\"nothex\"").is_err());
    }
}

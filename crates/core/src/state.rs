//! The box state machine. Every state change in the runtime goes through [`BoxState::transition`],
//! so an illegal move is caught in one place.
//!
//! | from \ to   | Created | Ready | Busy | Compacting | Stopped |
//! |-------------|---------|-------|------|------------|---------|
//! | Created     |    -    |  yes  |  -   |     -      |   yes   |
//! | Ready       |    -    |   -   | yes  |    yes     |   yes   |
//! | Busy        |    -    |  yes  |  -   |     -      |   yes   |
//! | Compacting  |    -    |  yes  |  -   |     -      |   yes   |
//! | Stopped     |    -    |   -   |  -   |     -      |    -    |
//!
//! Created->Ready when the box booted and its agent is healthy; Ready<->Busy while at least one
//! exec runs; Ready->Compacting->Ready while guest memory is reclaimed; anything->Stopped when the
//! VM ends for whatever reason. Nothing leaves Stopped: a restarted box is booted afresh and gets
//! a new state machine. Self-transitions are illegal: the runtime counts concurrent execs itself
//! and only moves Ready->Busy on the first and Busy->Ready on the last.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxState {
    Created,
    Ready,
    Busy,
    Compacting,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal box state transition {from} -> {to}")]
pub struct TransitionError {
    pub from: BoxState,
    pub to: BoxState,
}

impl BoxState {
    pub const ALL: [BoxState; 5] = [
        BoxState::Created,
        BoxState::Ready,
        BoxState::Busy,
        BoxState::Compacting,
        BoxState::Stopped,
    ];

    /// Whether the table above allows `self -> to`.
    pub fn can_transition(self, to: BoxState) -> bool {
        use BoxState::*;
        matches!(
            (self, to),
            (Created, Ready)
                | (Ready, Busy)
                | (Busy, Ready)
                | (Ready, Compacting)
                | (Compacting, Ready)
                | (Created | Ready | Busy | Compacting, Stopped)
        )
    }

    /// Moves to `to`, or explains why that move is illegal.
    pub fn transition(self, to: BoxState) -> Result<BoxState, TransitionError> {
        if self.can_transition(to) {
            Ok(to)
        } else {
            Err(TransitionError { from: self, to })
        }
    }

    /// A box that is booted and answering (Ready, Busy or Compacting).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            BoxState::Ready | BoxState::Busy | BoxState::Compacting
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BoxState::Created => "created",
            BoxState::Ready => "ready",
            BoxState::Busy => "busy",
            BoxState::Compacting => "compacting",
            BoxState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for BoxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::BoxState::{self, *};

    /// The documented table, written out independently of `can_transition`.
    const LEGAL: &[(BoxState, BoxState)] = &[
        (Created, Ready),
        (Created, Stopped),
        (Ready, Busy),
        (Ready, Compacting),
        (Ready, Stopped),
        (Busy, Ready),
        (Busy, Stopped),
        (Compacting, Ready),
        (Compacting, Stopped),
    ];

    #[test]
    fn every_pair_follows_the_table() {
        let mut legal_seen = 0;
        for from in BoxState::ALL {
            for to in BoxState::ALL {
                let expected = LEGAL.contains(&(from, to));
                let got = from.transition(to);
                if expected {
                    assert_eq!(got, Ok(to), "{from} -> {to} should be legal");
                    legal_seen += 1;
                } else {
                    let err = got.expect_err("illegal move accepted");
                    assert_eq!((err.from, err.to), (from, to));
                    assert_eq!(
                        err.to_string(),
                        format!("illegal box state transition {from} -> {to}")
                    );
                }
            }
        }
        assert_eq!(legal_seen, LEGAL.len());
    }

    #[test]
    fn nothing_leaves_stopped() {
        for to in BoxState::ALL {
            assert!(Stopped.transition(to).is_err(), "stopped -> {to}");
        }
    }

    #[test]
    fn a_typical_life() {
        let s = Created;
        let s = s.transition(Ready).unwrap();
        let s = s.transition(Busy).unwrap();
        let s = s.transition(Ready).unwrap();
        let s = s.transition(Compacting).unwrap();
        let s = s.transition(Ready).unwrap();
        assert!(s.is_running());
        let s = s.transition(Stopped).unwrap();
        assert!(!s.is_running());
    }

    #[test]
    fn serde_uses_lowercase_names() {
        assert_eq!(
            serde_json::to_string(&Compacting).unwrap(),
            "\"compacting\""
        );
        assert_eq!(serde_json::from_str::<BoxState>("\"busy\"").unwrap(), Busy);
    }
}

//! Resolves an OCI `User` string ("name", "uid", "name:group", "uid:gid", ...) against the box
//! image's own `/etc/passwd` and `/etc/group`, parsed here rather than through glibc NSS (a static
//! binary must not load NSS modules, and the files to read are the image's, not the agent's).

use std::fmt;

/// The identity a workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from /etc/group membership of the user name).
    pub groups: Vec<u32>,
    /// Home directory from /etc/passwd ("/" when the user has no entry).
    pub home: String,
}

/// One /etc/passwd entry (the fields the agent needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One /etc/group entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Why a user string could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    UnknownUser(String),
    UnknownGroup(String),
    Malformed(String),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::UnknownUser(u) => write!(f, "user {u:?} not found in the box's /etc/passwd"),
            UserError::UnknownGroup(g) => {
                write!(f, "group {g:?} not found in the box's /etc/group")
            }
            UserError::Malformed(s) => write!(
                f,
                "user {s:?} is malformed: expected \"name\", \"uid\", \"name:group\" or \"uid:gid\""
            ),
        }
    }
}

/// Parses passwd text. Malformed lines (hostile images) are skipped, never fatal.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses group text. Malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` (OCI image config `User` syntax). An empty spec is root.
/// A numeric uid without a passwd entry is allowed (gid 0, home "/"), as container engines do.
pub fn resolve(
    spec: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<Identity, UserError> {
    let spec = spec.trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Malformed(spec.to_string()));
    }
    let user_part = if user_part.is_empty() {
        if group_part.is_some() {
            return Err(UserError::Malformed(spec.to_string()));
        }
        "0"
    } else {
        user_part
    };

    let entry = if let Ok(uid) = user_part.parse::<u32>() {
        passwd
            .iter()
            .find(|p| p.uid == uid)
            .cloned()
            .unwrap_or(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: "/".to_string(),
            })
    } else {
        passwd
            .iter()
            .find(|p| p.name == user_part)
            .cloned()
            .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?
    };

    let gid = match group_part {
        None => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
    };

    // Supplementary groups only when no explicit group was asked for (as Docker does).
    let mut supplementary = vec![gid];
    if group_part.is_none() && !entry.name.is_empty() {
        for g in groups {
            if g.members.iter().any(|m| m == &entry.name) && !supplementary.contains(&g.gid) {
                supplementary.push(g.gid);
            }
        }
    }
    Ok(Identity {
        uid: entry.uid,
        gid,
        groups: supplementary,
        home: if entry.home.is_empty() {
            "/".to_string()
        } else {
            entry.home
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line without colons\n\
        bad:x:notanumber:1::/:/bin/sh\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/bash\n";
    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:alice,bob\n\
        alice:x:1000:\n\
        audio:x:29:alice\n\
        junk\n";

    fn res(s: &str) -> Result<Identity, UserError> {
        resolve(s, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn parses_and_skips_malformed_lines() {
        let p = parse_passwd(PASSWD);
        assert_eq!(
            p.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["root", "daemon", "alice"]
        );
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 4);
        assert_eq!(g[1].members, ["alice", "bob"]);
    }

    #[test]
    fn empty_is_root() {
        let id = res("").unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn name_gets_primary_and_supplementary_groups() {
        let id = res("alice").unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, vec![1000, 10, 29]);
        assert_eq!(id.home, "/home/alice");
    }

    #[test]
    fn numeric_forms() {
        assert_eq!(res("1000").unwrap().gid, 1000);
        let unknown = res("4242").unwrap();
        assert_eq!(
            (unknown.uid, unknown.gid, unknown.home.as_str()),
            (4242, 0, "/")
        );
        let id = res("4242:77").unwrap();
        assert_eq!((id.uid, id.gid), (4242, 77));
        assert_eq!(id.groups, vec![77]);
    }

    #[test]
    fn name_and_group_name() {
        let id = res("alice:wheel").unwrap();
        assert_eq!((id.uid, id.gid, id.groups.clone()), (1000, 10, vec![10]));
        let id = res("1:audio").unwrap();
        assert_eq!((id.uid, id.gid), (1, 29));
    }

    #[test]
    fn errors_name_what_is_missing() {
        assert_eq!(
            res("mallory"),
            Err(UserError::UnknownUser("mallory".into()))
        );
        assert_eq!(
            res("alice:nogroup"),
            Err(UserError::UnknownGroup("nogroup".into()))
        );
        assert!(matches!(res("a:b:c"), Err(UserError::Malformed(_))));
        assert!(matches!(res(":0"), Err(UserError::Malformed(_))));
        assert!(res("mallory")
            .unwrap_err()
            .to_string()
            .contains("/etc/passwd"));
    }
}

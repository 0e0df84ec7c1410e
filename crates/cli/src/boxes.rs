//! The box registry on disk: `$MICROBOX_ROOT/boxes/<id>/box.json`, one record per box.
//!
//! There is no daemon: every CLI process reads and writes these records directly. Records are
//! written atomically (temp file + rename) under a per-box `flock`, and creating a box takes a
//! registry-wide lock so that two CLIs racing for the same name cannot both win. Whether a box
//! is really running is never trusted from the record alone: the supervisor's pid and its start
//! time (from /proc) must still match, so a supervisor killed with SIGKILL is noticed.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fs4::fs_std::FileExt;
use microbox_core::{BoxConfig, BoxId, BoxState};
use serde::{Deserialize, Serialize};

/// Everything the CLI knows about one box.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoxRecord {
    pub id: BoxId,
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub image_digest: Option<String>,
    pub config: BoxConfig,
    /// The main process (ENTRYPOINT + CMD after overrides); empty = none (an idle box).
    pub command: Vec<String>,
    /// Effective environment of processes in the box (image Env, then `-e` overrides).
    #[serde(default)]
    pub env: Vec<String>,
    /// Effective working directory and user (image config unless overridden).
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
    /// The main process is run by an attached CLI (`-i`/`-t`), not by the supervisor.
    #[serde(default)]
    pub attached: bool,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub auto_remove: bool,
    /// The foreground CLI following this box (it removes a `--rm` box itself after printing
    /// the last output; the supervisor does it only when no such CLI is alive).
    #[serde(default)]
    pub client: Option<ProcRef>,
    pub state: BoxState,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub supervisor: Option<ProcRef>,
    /// Pids of the VMM and its helpers, by role, as reported by the runtime.
    #[serde(default)]
    pub pids: BTreeMap<String, u32>,
    pub created_at: String,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Pid (in the guest) of the main process while it runs, for `kill -s`.
    #[serde(default)]
    pub main_pid: Option<u32>,
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
}

/// A process identified robustly: pid plus its start time (clock ticks since boot), so that a
/// recycled pid is not mistaken for the original process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: u32,
    pub start_ticks: u64,
}

impl ProcRef {
    pub fn of(pid: u32) -> Option<ProcRef> {
        Some(ProcRef {
            pid,
            start_ticks: proc_start_ticks(pid)?,
        })
    }

    pub fn current() -> ProcRef {
        ProcRef::of(std::process::id()).expect("/proc/self/stat is readable")
    }

    pub fn alive(&self) -> bool {
        proc_start_ticks(self.pid) == Some(self.start_ticks) && !is_zombie(self.pid)
    }
}

fn read_stat(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may hold spaces and parentheses, so
/// parse from the last ')'.
fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = read_stat(pid)?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    read_stat(pid)
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

pub struct BoxStore {
    dir: PathBuf,
}

impl BoxStore {
    pub fn open(root: &Path) -> Result<BoxStore> {
        let dir = root.join("boxes");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(BoxStore { dir })
    }

    pub fn box_dir(&self, id: &BoxId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    fn record_path(&self, id: &BoxId) -> PathBuf {
        self.box_dir(id).join("box.json")
    }

    /// Takes the registry-wide lock (held until the returned file is dropped).
    fn lock_registry(&self) -> Result<File> {
        lock_file(&self.dir.join(".lock"))
    }

    /// Takes one box's lock, for read-modify-write of its record.
    pub fn lock_box(&self, id: &BoxId) -> Result<File> {
        lock_file(&self.box_dir(id).join(".lock"))
    }

    /// Registers a new box; fails if its name is taken. The box directory is created 0700.
    pub fn create(&self, record: &BoxRecord) -> Result<()> {
        validate_name(&record.name)?;
        let _guard = self.lock_registry()?;
        if let Some(other) = self.list()?.into_iter().find(|r| r.name == record.name) {
            bail!(
                "the name '{}' is already used by box {} (remove it with: microbox rm {})",
                record.name,
                other.id.short(),
                record.name
            );
        }
        let dir = self.box_dir(&record.id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        self.save(record)
    }

    /// Writes a record atomically.
    pub fn save(&self, record: &BoxRecord) -> Result<()> {
        let path = self.record_path(&record.id);
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(record)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
        Ok(())
    }

    pub fn load(&self, id: &BoxId) -> Result<BoxRecord> {
        let path = self.record_path(id);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Applies `f` to the record under the box lock and saves it.
    pub fn update(&self, id: &BoxId, f: impl FnOnce(&mut BoxRecord)) -> Result<BoxRecord> {
        let _guard = self.lock_box(id)?;
        let mut rec = self.load(id)?;
        f(&mut rec);
        self.save(&rec)?;
        Ok(rec)
    }

    /// Every box with a readable record, oldest first. Directories without a record (a create
    /// interrupted before its first write) are skipped.
    pub fn list(&self) -> Result<Vec<BoxRecord>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(id) = BoxId::parse(&name) else {
                continue;
            };
            if let Ok(rec) = self.load(&id) {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    /// Finds a box by name, full id or unique id prefix.
    pub fn resolve(&self, key: &str) -> Result<BoxRecord> {
        let all = self.list()?;
        if let Some(r) = all.iter().find(|r| r.name == key) {
            return Ok(r.clone());
        }
        let ids: Vec<BoxId> = all.iter().map(|r| r.id.clone()).collect();
        match BoxId::resolve_prefix(key, &ids) {
            Ok(id) => Ok(all
                .into_iter()
                .find(|r| &r.id == id)
                .expect("id came from list")),
            Err(microbox_core::IdError::Ambiguous { matches, .. }) => {
                Err(crate::UserError::new(format!(
                    "'{key}' matches {matches} boxes: give more of the id (see: microbox ps -a)"
                ))
                .into())
            }
            Err(_) => Err(crate::UserError::new(format!(
                "no such box '{key}' (see: microbox ps -a)"
            ))
            .into()),
        }
    }

    /// The record with its state corrected for reality: a record that says the box runs while
    /// its supervisor is gone is reported Stopped, with the reason.
    pub fn observe(&self, mut rec: BoxRecord) -> BoxRecord {
        let supervised = matches!(
            rec.state,
            BoxState::Created | BoxState::Ready | BoxState::Busy | BoxState::Compacting
        );
        if supervised {
            if let Some(sup) = rec.supervisor {
                if !sup.alive() {
                    // The supervisor may have recorded the end and exited between our read of
                    // the record and the liveness check: read again before calling it a crash.
                    if let Ok(fresh) = self.load(&rec.id) {
                        if fresh.state == BoxState::Stopped {
                            return fresh;
                        }
                    }
                    rec.state = BoxState::Stopped;
                    rec.reason = Some(format!(
                        "supervisor (pid {}) died without recording why",
                        sup.pid
                    ));
                }
            }
        }
        rec
    }

    pub fn remove_dir(&self, id: &BoxId) -> Result<()> {
        let dir = self.box_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
}

fn lock_file(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock {}", path.display()))?;
    f.lock_exclusive()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(f)
}

/// Docker's rule for names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn validate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 128;
    if !ok {
        return Err(crate::UserError::new(format!(
            "invalid box name '{name}': use letters, digits, '_', '.' or '-', starting with a letter or digit"
        ))
        .into());
    }
    Ok(())
}

/// A readable random name (`brave-otter-3f2a`), for boxes created without `--name`.
pub fn random_name(id: &BoxId) -> String {
    const ADJ: &[&str] = &[
        "brave", "calm", "eager", "fuzzy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
        "nimble", "proud", "quiet", "rapid", "sunny", "tidy", "vivid", "witty", "young", "zesty",
    ];
    const NOUN: &[&str] = &[
        "otter", "falcon", "lynx", "heron", "panda", "badger", "cobra", "dingo", "eagle", "ferret",
        "gecko", "ibis", "koala", "lemur", "marten", "newt", "orca", "puffin", "quokka", "raven",
    ];
    let b = id.as_str().as_bytes();
    let n = |i: usize| (b[i] as usize) * 31 + b[i + 1] as usize;
    format!(
        "{}-{}-{}",
        ADJ[n(0) % ADJ.len()],
        NOUN[n(2) % NOUN.len()],
        &id.as_str()[4..8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(name: &str) -> BoxRecord {
        BoxRecord {
            id: BoxId::random(),
            name: name.into(),
            image: "busybox".into(),
            image_digest: None,
            config: BoxConfig::new("busybox"),
            command: vec!["true".into()],
            env: vec![],
            working_dir: "/".into(),
            user: String::new(),
            attached: false,
            tty: false,
            auto_remove: false,
            client: None,
            state: BoxState::Created,
            reason: None,
            supervisor: None,
            pids: BTreeMap::new(),
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            main_pid: None,
            agent_socket: None,
        }
    }

    #[test]
    fn create_resolve_update_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BoxStore::open(tmp.path()).unwrap();
        let a = record("web");
        store.create(&a).unwrap();
        let mode = fs::metadata(store.box_dir(&a.id))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(store.resolve("web").unwrap().id, a.id);
        assert_eq!(store.resolve(&a.id.as_str()[..6]).unwrap().id, a.id);
        assert_eq!(store.resolve(a.id.as_str()).unwrap().id, a.id);
        let err = store.resolve("nope").unwrap_err().to_string();
        assert_eq!(err, "no such box 'nope' (see: microbox ps -a)");

        let dup = record("web");
        let err = store.create(&dup).unwrap_err().to_string();
        assert!(err.contains("already used"), "{err}");

        let updated = store.update(&a.id, |r| r.exit_code = Some(3)).unwrap();
        assert_eq!(updated.exit_code, Some(3));
        assert_eq!(store.load(&a.id).unwrap().exit_code, Some(3));

        store.remove_dir(&a.id).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn racing_creators_of_one_name_one_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let root = root.clone();
                std::thread::spawn(move || {
                    BoxStore::open(&root)
                        .unwrap()
                        .create(&record("same"))
                        .is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(wins, 1);
    }

    #[test]
    fn a_dead_supervisor_shows_as_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BoxStore::open(tmp.path()).unwrap();
        let mut r = record("x");
        r.state = BoxState::Ready;
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let sup = ProcRef::of(pid);
        child.wait().unwrap();
        // Reaped: the pid is gone (or recycled with another start time).
        r.supervisor = Some(sup.unwrap_or(ProcRef {
            pid,
            start_ticks: 1,
        }));
        let seen = store.observe(r.clone());
        assert_eq!(seen.state, BoxState::Stopped);
        assert!(seen.reason.unwrap().contains("supervisor"));
        r.supervisor = Some(ProcRef::current());
        assert_eq!(store.observe(r).state, BoxState::Ready);
    }

    #[test]
    fn names_are_checked_and_generated_names_are_valid() {
        assert!(validate_name("web-1.a_b").is_ok());
        for bad in ["", "-x", "a b", "a/b", "ü"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        let id = BoxId::random();
        validate_name(&random_name(&id)).unwrap();
    }
}

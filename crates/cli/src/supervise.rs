//! The per-box supervisor: `microbox supervise ID`, started by `run`/`start` in its own session
//! so that the box outlives the CLI. It owns the VM (through `VmManager`), serves the box's
//! `agent.sock`, runs the main process and writes its output to the box log, records every state
//! change in the box record, and tears the VM down when the main process ends, when asked to
//! stop (SIGTERM), or when the VM dies on its own.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use microbox_core::{BoxEvent, BoxId, BoxState, EventEmitter};
use microbox_runtime::agent_client::{ExecEvent, ExecSpec};
use microbox_runtime::eventlog;
use microbox_runtime::{ExecRequest, VmManager};
use tokio::signal::unix::{signal, SignalKind};

use crate::boxes::{now_rfc3339, BoxStore, ProcRef};
use crate::commands::Ctx;
use crate::logs::{LogWriter, Stream};

/// Starts the supervisor of box `id` as a detached process in its own session and returns its
/// pid once it has recorded itself.
pub fn spawn(ctx: &Ctx, id: &BoxId) -> Result<u32> {
    let store = ctx.boxes()?;
    let dir = store.box_dir(id);
    let log = std::fs::File::create(dir.join("supervisor.log"))?;
    let exe = std::env::current_exe().context("locating the microbox binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&ctx.root)
        .arg("supervise")
        .arg(id.as_str())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from our terminal and
    // process group so that ^C on the CLI or the CLI's death does not reach the box.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the box supervisor")?;
    let pid = child.id();
    // The supervisor is reparented to init when we exit; nothing to wait for here.
    std::mem::forget(child);
    Ok(pid)
}

pub fn supervise(ctx: &Ctx, id: &str) -> Result<()> {
    let id = BoxId::parse(id)?;
    let store = ctx.boxes()?;
    store.update(&id, |r| {
        r.supervisor = Some(ProcRef::current());
        r.reason = None;
    })?;
    let rt = ctx.tokio()?;
    let result = rt.block_on(supervise_async(ctx, &store, &id));
    if let Err(e) = &result {
        let msg = format!("{e:#}");
        eprintln!("supervisor: {msg}");
        let _ = store.update(&id, |r| {
            r.state = BoxState::Stopped;
            r.reason = Some(msg);
            r.finished_at = Some(now_rfc3339());
        });
    }
    // --rm: the record goes too, whatever happened.
    if let Ok(rec) = store.load(&id) {
        let client_follows = rec.client.is_some_and(|c| c.alive());
        if rec.auto_remove && rec.state == BoxState::Stopped && !client_follows {
            let _ = store.remove_dir(&id);
        }
    }
    result
}

async fn supervise_async(ctx: &Ctx, store: &BoxStore, id: &BoxId) -> Result<()> {
    let emitter = EventEmitter::default();
    let log = tokio::spawn(eventlog::persist(
        emitter.subscribe(),
        eventlog::events_path(&ctx.root),
    ));
    let result = run_box(ctx, store, id, &emitter).await;
    if let Err(e) = &result {
        emitter.emit(
            id,
            BoxEvent::Error {
                message: format!("{e:#}"),
            },
        );
    }
    // The log task ends once the last emitter is gone; give it a moment to flush.
    drop(emitter);
    let _ = tokio::time::timeout(Duration::from_secs(2), log).await;
    result
}

async fn run_box(ctx: &Ctx, store: &BoxStore, id: &BoxId, emitter: &EventEmitter) -> Result<()> {
    let rec = store.load(id)?;
    let vm = VmManager::with_id(rec.config.clone(), emitter.clone(), &ctx.root, id.clone());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // Boot, but give up promptly if asked to stop meanwhile.
    let booted = tokio::select! {
        r = vm.boot() => r.map(|_| true),
        _ = term.recv() => Ok(false),
        _ = int.recv() => Ok(false),
    };
    match booted {
        Ok(true) => {}
        Ok(false) => {
            vm.stop(Duration::ZERO).await.ok();
            return stopped(store, id, "stopped during boot", None);
        }
        Err(e) => {
            // A failed boot cleans up its processes; stop() makes sure and is idempotent.
            vm.stop(Duration::ZERO).await.ok();
            return Err(anyhow::Error::new(e).context("boot failed"));
        }
    }
    let pids = vm
        .processes()
        .into_iter()
        .map(|p| (p.name, p.pid))
        .collect();
    store.update(id, |r| {
        r.state = BoxState::Ready;
        r.started_at = Some(now_rfc3339());
        r.agent_socket = Some(vm.agent_socket());
        r.pids = pids;
    })?;

    let main = (!rec.attached && !rec.command.is_empty())
        .then(|| run_main(&vm, store, id, rec.command.clone(), emitter));
    let main = async {
        match main {
            Some(f) => f.await,
            None => std::future::pending().await,
        }
    };
    // An attached box's main process runs in its CLI (over agent.sock): if that CLI dies
    // (terminal closed, SIGKILL) nobody would ever end the box.
    let attached_client = rec.client.filter(|_| rec.attached);
    let client_gone = async move {
        match attached_client {
            Some(c) => {
                while c.alive() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            None => std::future::pending().await,
        }
    };
    let (reason, exit_code) = tokio::select! {
        r = main => match r {
            Ok(code) => ("exited".to_string(), Some(code)),
            Err(e) => (format!("main process failed: {e:#}"), Some(exit_code_for_error(&e))),
        },
        _ = term.recv() => ("stopped".to_string(), None),
        _ = int.recv() => ("stopped".to_string(), None),
        why = wait_vm_stopped(&vm) => (format!("the VM stopped: {why}"), None),
        _ = client_gone => ("its attached CLI went away".to_string(), None),
    };
    // The main process's stream breaks when the VM dies; the runtime's watcher says why the
    // VM died a moment later, and that is the reason worth keeping.
    // (127/126 are the agent's own answers: the VM is fine then.)
    let reason = if reason.starts_with("main process failed") && exit_code == Some(125) {
        match tokio::time::timeout(Duration::from_secs(2), wait_vm_stopped(&vm)).await {
            Ok(why) => format!("the VM stopped: {why}"),
            Err(_) => reason,
        }
    } else {
        reason
    };
    // Read now: `stop -t N` writes it just before it signals us.
    let stop_timeout = Duration::from_secs(rec_stop_timeout(store, id));
    // Keep the exit code an attached CLI recorded, if any.
    let exit_code = exit_code.or_else(|| store.load(id).ok().and_then(|r| r.exit_code));
    // After the main process ended, a non-persistent box has nothing worth a clean guest
    // shutdown: its writable layer is guest tmpfs, discarded either way. Persistent boxes and
    // requested stops get the graceful path (the main process is signalled and the guest syncs).
    let main_ended = reason == "exited" || reason.starts_with("main process failed");
    let stop_timeout = if main_ended && !rec.config.persistent {
        Duration::ZERO
    } else {
        stop_timeout
    };
    if let Err(e) = vm.stop(stop_timeout).await {
        tracing::warn!("stopping the VM: {e}");
    }
    // The box directory holds the record and the log: only --rm removes it (in `supervise`).
    stopped(store, id, &reason, exit_code)
}

/// Resolves when the VM ends on its own (the runtime's watcher moves the box to Stopped).
async fn wait_vm_stopped(vm: &VmManager) -> String {
    while vm.state() != BoxState::Stopped {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    vm.stop_reason().unwrap_or_else(|| "unknown reason".into())
}

fn rec_stop_timeout(store: &BoxStore, id: &BoxId) -> u64 {
    std::fs::read_to_string(store.box_dir(id).join("stop-timeout"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(10)
}

fn stopped(store: &BoxStore, id: &BoxId, reason: &str, exit_code: Option<i32>) -> Result<()> {
    store.update(id, |r| {
        r.state = BoxState::Stopped;
        r.reason = Some(reason.to_string());
        r.exit_code = exit_code.or(r.exit_code);
        r.finished_at = Some(now_rfc3339());
        r.pids.clear();
        r.main_pid = None;
    })?;
    Ok(())
}

/// Runs the main process, streaming its output into the box log; returns Docker's exit code.
async fn run_main(
    vm: &VmManager,
    store: &BoxStore,
    id: &BoxId,
    argv: Vec<String>,
    emitter: &EventEmitter,
) -> Result<i32> {
    let _busy = vm.begin_exec()?;
    let resolved = vm.resolve_exec(&ExecRequest::new(argv.clone()));
    let spec = ExecSpec {
        argv: resolved.argv,
        env: resolved.env,
        cwd: resolved.cwd,
        user: resolved.user,
        ..Default::default()
    };
    let exec_id = 0;
    emitter.emit(id, BoxEvent::ExecStarted { exec_id, argv });
    let started = std::time::Instant::now();
    let result = async {
        let client = vm.agent_client()?;
        let mut session = client.exec_session(spec).await?;
        let pid = session.pid();
        store.update(id, |r| r.main_pid = Some(pid))?;
        let mut log = LogWriter::open(&store.box_dir(id))?;
        loop {
            match session.next_event().await? {
                Some(ExecEvent::Stdout(d)) => log.write(Stream::Stdout, &d)?,
                Some(ExecEvent::Stderr(d)) => log.write(Stream::Stderr, &d)?,
                Some(ExecEvent::Exited(st)) => break Ok::<_, anyhow::Error>(st),
                None => anyhow::bail!("the main process's stream ended without an exit status"),
            }
        }
    }
    .await;
    let (exit_code, signal) = match &result {
        Ok(st) => (st.exit_code, st.signal),
        Err(_) => (None, None),
    };
    emitter.emit(
        id,
        BoxEvent::ExecFinished {
            exec_id,
            exit_code,
            signal,
            duration_ms: started.elapsed().as_millis() as u64,
        },
    );
    Ok(crate::commands::lifecycle::docker_code(&result?))
}

fn exit_code_for_error(e: &anyhow::Error) -> i32 {
    crate::commands::lifecycle::exec_error_code(e).into()
}

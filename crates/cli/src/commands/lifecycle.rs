//! Commands that start, stop and talk to boxes: run, create, start, stop, kill, exec, cp,
//! health, stats. Boxes run under their own supervisor process (see `supervise`); these
//! commands talk to it through the box record and signals, and to the guest agent through the
//! box's `agent.sock`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use microbox_core::{BoxConfig, BoxId, BoxState, NetworkMode, PortMapping, Protocol, VolumeMount};
use microbox_runtime::agent_client::{AgentClient, AgentClientError, ExecSpec, ExitStatus};

use super::Ctx;
use crate::boxes::{now_rfc3339, random_name, BoxRecord, BoxStore};
use crate::cli::{parse_memory_mib, ExecArgs, RunArgs};
use crate::logs;
use crate::{UserError, WorkloadExit};

pub fn run(ctx: &Ctx, args: RunArgs, start: bool) -> Result<()> {
    let config = box_config(&ctx.root, &args)?;
    config
        .validate()
        .map_err(|e| UserError::new(e.to_string()))?;
    if start {
        check_ports_free(&config.ports)?;
    }
    let rt = ctx.tokio()?;
    let image = rt.block_on(super::image::ensure(
        ctx,
        &args.image,
        args.platform.as_deref(),
    ))?;
    let run_cfg = &image.config;

    // Docker's rules: --entrypoint replaces ENTRYPOINT and drops the image's CMD; arguments
    // after the image replace CMD.
    let entrypoint = match &args.entrypoint {
        Some(ep) if ep.is_empty() => vec![],
        Some(ep) => vec![ep.clone()],
        None => run_cfg.entrypoint.clone(),
    };
    let cmd = if !args.command.is_empty() {
        args.command.clone()
    } else if args.entrypoint.is_some() {
        vec![]
    } else {
        run_cfg.cmd.clone()
    };
    let command: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if command.is_empty() {
        return Err(UserError::new(format!(
            "image '{}' has no ENTRYPOINT or CMD: give a command after the image name",
            args.image
        ))
        .into());
    }

    let id = BoxId::random();
    let name = args.name.clone().unwrap_or_else(|| random_name(&id));
    let attached = (args.interactive || args.tty) && !args.detach;
    let rec = BoxRecord {
        id: id.clone(),
        name,
        image: image.reference.clone(),
        image_digest: Some(image.manifest_digest.clone()),
        env: merge_env(&run_cfg.env, &config.env),
        working_dir: config
            .working_dir
            .clone()
            .or_else(|| Some(run_cfg.working_dir.clone()).filter(|w| !w.is_empty()))
            .unwrap_or_else(|| "/".into()),
        user: config.user.clone().unwrap_or_else(|| run_cfg.user.clone()),
        config,
        command,
        attached,
        tty: args.tty,
        auto_remove: args.rm,
        client: (!args.detach && start).then(crate::boxes::ProcRef::current),
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
    };
    let store = ctx.boxes()?;
    store.create(&rec)?;
    if !start {
        println!("{}", id);
        return Ok(());
    }
    start_one(ctx, &store, &rec, args.detach)
}

/// Boots a created box under a new supervisor and, unless detached, stays with it until its
/// main process ends.
fn start_one(ctx: &Ctx, store: &BoxStore, rec: &BoxRecord, detach: bool) -> Result<()> {
    let pid = crate::supervise::spawn(ctx, &rec.id)?;
    let booted = wait_booted(
        store,
        &rec.id,
        pid,
        rec.config.boot_timeout + Duration::from_secs(30),
    )?;
    // Stopped without ever starting means the boot failed. A box that booted and whose main
    // process already ended (a missing command, a quick `true`) has `started_at` set: it goes
    // down the normal path below so that its exit code and output reach the caller.
    if booted.state == BoxState::Stopped && booted.started_at.is_none() {
        let reason = booted.reason.unwrap_or_else(|| "unknown reason".into());
        if rec.auto_remove {
            store.remove_dir(&rec.id).ok();
        }
        return Err(UserError::new(format!(
            "box '{}' did not start: {reason} (console: microbox logs --console {})",
            rec.name, rec.name
        ))
        .into());
    }
    if detach {
        println!("{}", rec.id);
        return Ok(());
    }
    if rec.attached {
        return run_attached(ctx, store, &booted);
    }
    follow_until_stopped(store, &booted)
}

/// Waits until the supervisor reports the box booted (Ready) or failed (Stopped).
fn wait_booted(store: &BoxStore, id: &BoxId, sup_pid: u32, limit: Duration) -> Result<BoxRecord> {
    let start = Instant::now();
    loop {
        let rec = store.observe(store.load(id)?);
        if rec.state != BoxState::Created {
            return Ok(rec);
        }
        if rec.supervisor.is_none() && !pid_alive(sup_pid) {
            return Err(UserError::new(format!(
                "the supervisor of box '{}' exited before booting it (see {})",
                rec.name,
                store.box_dir(id).join("supervisor.log").display()
            ))
            .into());
        }
        if start.elapsed() > limit {
            return Err(UserError::new(format!(
                "box '{}' did not boot within {limit:?}",
                rec.name
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Streams the box log to our stdout/stderr until the box stops, then exits with its code.
/// ^C asks the box to stop (like Docker's signal proxy), and we keep following until it has.
fn follow_until_stopped(store: &BoxStore, rec: &BoxRecord) -> Result<()> {
    let dir = store.box_dir(&rec.id);
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    let sup = rec.supervisor;
    // A plain thread waits for SIGINT so that the follow loop stays synchronous.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    if let Some(s) = sup {
                        // SAFETY: kill(2) to our own box's supervisor.
                        unsafe { libc::kill(s.pid as i32, libc::SIGTERM) };
                    }
                }
            });
        }
    });
    let (mut follower, chunks) = logs::LogFollower::from_start(&dir)?;
    logs::print_chunks(&chunks, false)?;
    loop {
        let chunks = follower.poll()?;
        logs::print_chunks(&chunks, false)?;
        if chunks.is_empty() {
            let r = match store.load(&rec.id) {
                Ok(r) => store.observe(r),
                Err(_) => return Err(UserError::new("the box was removed while running").into()),
            };
            if r.state == BoxState::Stopped {
                logs::print_chunks(&follower.poll()?, false)?;
                return finish(store, &r);
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

/// Ends `run` with the workload's exit code; 125 when the box stopped for another reason.
fn finish(store: &BoxStore, r: &BoxRecord) -> Result<()> {
    if r.auto_remove {
        store.remove_dir(&r.id).ok();
    }
    match r.exit_code {
        Some(0) => Ok(()),
        Some(c) => {
            // 126/127: the command could not be started; say why, like Docker.
            if let Some(reason) = r
                .reason
                .as_deref()
                .filter(|m| m.starts_with("main process failed"))
            {
                eprintln!("microbox: {reason}");
            }
            Err(WorkloadExit(c.clamp(0, 255) as u8).into())
        }
        None => Err(UserError::new(format!(
            "box '{}' stopped: {}",
            r.name,
            r.reason.clone().unwrap_or_default()
        ))
        .into()),
    }
}

/// `-i`/`-t`: the CLI itself runs the main process over `agent.sock`, with our stdin and
/// terminal, then records its exit code and stops the box.
fn run_attached(ctx: &Ctx, store: &BoxStore, rec: &BoxRecord) -> Result<()> {
    let spec = ExecSpec {
        argv: rec.command.clone(),
        env: rec.env.clone(),
        cwd: rec.working_dir.clone(),
        user: rec.user.clone(),
        tty: rec.tty,
        stdin: true,
        ..tty_size(rec.tty)
    };
    let rt = ctx.tokio()?;
    let sock = rec
        .agent_socket
        .clone()
        .context("the box has no agent socket")?;
    let code = rt.block_on(exec_stdio(&sock, spec));
    // Our stdin reader may sit in a blocking read forever: do not wait for it.
    rt.shutdown_background();
    let code_for_record = match &code {
        Ok(c) => *c,
        Err(e) => exec_error_code(e).into(),
    };
    store.update(&rec.id, |r| r.exit_code = Some(code_for_record))?;
    if let Some(s) = rec.supervisor {
        // SAFETY: kill(2) to our own box's supervisor: the main process is over, stop the box.
        unsafe { libc::kill(s.pid as i32, libc::SIGTERM) };
    }
    let r = super::boxes::wait_stopped(store, rec)?;
    let code = code?;
    let mut r = r;
    r.exit_code = Some(code);
    finish(store, &r)
}

fn tty_size(tty: bool) -> ExecSpec {
    let (rows, cols) = if tty {
        crate::progress::terminal_size().unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    ExecSpec {
        rows: rows.into(),
        cols: cols.into(),
        ..Default::default()
    }
}

/// Docker's exit code of a process: its own, or 128 + the signal that killed it.
pub fn docker_code(s: &ExitStatus) -> i32 {
    match (s.exit_code, s.signal) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 125,
    }
}

/// Runs one process in the box with our stdio attached; returns its Docker-style exit code.
async fn exec_stdio(sock: &Path, spec: ExecSpec) -> Result<i32> {
    let client = AgentClient::connect_unix(sock)
        .await
        .with_context(|| format!("connecting to the box agent at {}", sock.display()))?;
    let status = if spec.tty && std::io::stdin().is_terminal() {
        crate::progress::with_raw_terminal(|| exec_tty(&client, spec)).await?
    } else {
        let stdin = spec.stdin.then(tokio::io::stdin);
        client
            .exec(spec, stdin, tokio::io::stdout(), tokio::io::stderr())
            .await?
    };
    Ok(docker_code(&status))
}

/// An interactive terminal session: keys in, screen out, window size changes forwarded.
async fn exec_tty(client: &AgentClient, spec: ExecSpec) -> Result<ExitStatus> {
    use microbox_runtime::agent_client::ExecEvent;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut session = client.exec_session(spec).await?;
    let (key_tx, mut key_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    // Reading our stdin blocks; a dedicated task feeds the channel.
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 || key_tx.send(buf[..n].to_vec()).await.is_err() {
                break;
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut out = tokio::io::stdout();
    loop {
        tokio::select! {
            ev = session.next_event() => match ev? {
                Some(ExecEvent::Stdout(d)) | Some(ExecEvent::Stderr(d)) => {
                    out.write_all(&d).await?;
                    out.flush().await?;
                }
                Some(ExecEvent::Exited(st)) => return Ok(st),
                None => anyhow::bail!("the exec ended without an exit status"),
            },
            Some(keys) = key_rx.recv() => session.write_stdin(keys).await?,
            _ = winch.recv() => {
                if let Some((r, c)) = crate::progress::terminal_size() {
                    session.resize(r.into(), c.into()).await?;
                }
            }
        }
    }
}

/// Maps a failure to start a process to Docker's codes: 127 not found, 126 cannot run.
pub fn exec_error_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(code) = cause
            .downcast_ref::<AgentClientError>()
            .and_then(AgentClientError::code)
        {
            return match code {
                tonic::Code::NotFound => 127,
                tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => 126,
                _ => 125,
            };
        }
    }
    125
}

pub fn exec(ctx: &Ctx, args: ExecArgs) -> Result<()> {
    let store = ctx.boxes()?;
    let rec = store.observe(store.resolve(&args.target)?);
    if !rec.state.is_running() {
        return Err(UserError::new(format!(
            "box '{}' is not running (state {}; start it with: microbox start {})",
            rec.name, rec.state, rec.name
        ))
        .into());
    }
    let sock = rec
        .agent_socket
        .clone()
        .context("the box has no agent socket")?;
    let spec = ExecSpec {
        argv: args.command.clone(),
        env: merge_env(&rec.env, &expand_env(&args.env)?),
        cwd: args
            .workdir
            .clone()
            .unwrap_or_else(|| rec.working_dir.clone()),
        user: args.user.clone().unwrap_or_else(|| rec.user.clone()),
        tty: args.tty,
        stdin: args.interactive,
        ..tty_size(args.tty)
    };
    let rt = ctx.tokio()?;
    // Execs from the CLI reach the agent directly; record them in the event log ourselves.
    let emitter = microbox_core::EventEmitter::new(4);
    let log = microbox_runtime::eventlog::events_path(&ctx.root);
    let started = Instant::now();
    let exec_id = u64::from(std::process::id());
    let record = |ev| {
        let rec = emitter.emit(&rec.id, ev);
        if let Err(e) = microbox_runtime::eventlog::append_json(&log, &rec) {
            tracing::warn!("writing the event log: {e}");
        }
    };
    record(microbox_core::BoxEvent::ExecStarted {
        exec_id,
        argv: args.command.clone(),
    });
    let result = rt.block_on(exec_stdio(&sock, spec));
    // Our stdin reader may sit in a blocking read forever: do not wait for it.
    rt.shutdown_background();
    record(microbox_core::BoxEvent::ExecFinished {
        exec_id,
        exit_code: result.as_ref().ok().copied(),
        signal: None,
        duration_ms: started.elapsed().as_millis() as u64,
    });
    match result {
        Ok(0) => Ok(()),
        Ok(c) => Err(WorkloadExit(c.clamp(0, 255) as u8).into()),
        Err(e) => {
            let code = exec_error_code(&e);
            Err(UserError::with_code(describe_agent_error(&rec, &e), code).into())
        }
    }
}

/// An agent error as one line; a broken connection (the agent or the VM does not answer) says
/// so and where to look, rather than only "transport error".
fn describe_agent_error(rec: &BoxRecord, e: &anyhow::Error) -> String {
    let unreachable = e.chain().any(|c| {
        c.downcast_ref::<AgentClientError>()
            .is_some_and(AgentClientError::is_connection_lost)
    });
    if unreachable {
        format!(
            "box '{}' does not answer: its agent could not be reached ({e:#}); \
             see: microbox logs --console {}",
            rec.name, rec.name
        )
    } else {
        format!("{e:#}")
    }
}

pub fn start(ctx: &Ctx, keys: &[String], attach: bool) -> Result<()> {
    let store = ctx.boxes()?;
    for k in keys {
        let rec = store.observe(store.resolve(k)?);
        if rec.state.is_running() {
            println!("{}", rec.name);
            continue;
        }
        // A stopped box boots afresh: a new VM, a new log section, a new exit code.
        let rec = store.update(&rec.id, |r| {
            r.state = BoxState::Created;
            r.reason = None;
            r.exit_code = None;
            r.started_at = None;
            r.finished_at = None;
            r.supervisor = None;
            r.client = attach.then(crate::boxes::ProcRef::current);
        })?;
        start_one(ctx, &store, &rec, !attach)?;
    }
    Ok(())
}

/// Asks the supervisor to stop the box and waits (at most `timeout` plus a grace period)
/// before killing what is left.
pub fn stop_box(store: &BoxStore, rec: &BoxRecord, timeout: Duration) -> Result<()> {
    let Some(sup) = rec.supervisor.filter(|s| s.alive()) else {
        super::boxes::kill_pidfiles(&store.box_dir(&rec.id));
        if rec.state != BoxState::Stopped {
            store.update(&rec.id, |r| {
                r.state = BoxState::Stopped;
                r.reason.get_or_insert_with(|| "supervisor gone".into());
            })?;
        }
        return Ok(());
    };
    std::fs::write(
        store.box_dir(&rec.id).join("stop-timeout"),
        timeout.as_secs().to_string(),
    )?;
    // SAFETY: kill(2) to the box's own supervisor (verified alive by pid and start time).
    unsafe { libc::kill(sup.pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + timeout + Duration::from_secs(20);
    while sup.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if sup.alive() {
        // SAFETY: as above; the supervisor did not finish in time.
        unsafe { libc::kill(sup.pid as i32, libc::SIGKILL) };
        super::boxes::kill_pidfiles(&store.box_dir(&rec.id));
        store.update(&rec.id, |r| {
            r.state = BoxState::Stopped;
            r.reason = Some("killed after the stop timeout".into());
        })?;
    }
    Ok(())
}

pub fn stop(ctx: &Ctx, keys: &[String], secs: u64) -> Result<()> {
    let store = ctx.boxes()?;
    for k in keys {
        let rec = store.observe(store.resolve(k)?);
        stop_box(&store, &rec, Duration::from_secs(secs))?;
        println!("{}", rec.name);
    }
    Ok(())
}

/// How long `kill` waits for the box to end when the signal's answer was lost with the VM.
const KILL_END_WAIT: Duration = Duration::from_secs(10);

pub fn kill(ctx: &Ctx, keys: &[String], signal: &str) -> Result<()> {
    let sig = parse_signal(signal)?;
    let store = ctx.boxes()?;
    for k in keys {
        let rec = store.observe(store.resolve(k)?);
        if !rec.state.is_running() {
            return Err(UserError::new(format!("box '{}' is not running", rec.name)).into());
        }
        if sig == libc::SIGKILL {
            stop_box(&store, &rec, Duration::ZERO)?;
        } else {
            let sock = rec
                .agent_socket
                .clone()
                .context("the box has no agent socket")?;
            let pid = rec.main_pid.ok_or_else(|| {
                UserError::new(format!("box '{}' has no main process to signal", rec.name))
            })?;
            let sent = ctx.tokio()?.block_on(async {
                let c = AgentClient::connect_unix(&sock).await?;
                c.signal(pid, sig, false).await
            });
            match sent {
                Ok(()) => {}
                // The signal can end the main process, and with it the VM, before the agent's
                // answer leaves the guest: a lost connection followed by the box ending is a
                // delivered signal.
                Err(e)
                    if e.is_connection_lost()
                        && super::boxes::stopped_within(&store, &rec, Some(KILL_END_WAIT))
                            .is_ok_and(|r| r.is_some()) => {}
                Err(e) => return Err(UserError::new(describe_agent_error(&rec, &e.into())).into()),
            }
        }
        println!("{}", rec.name);
    }
    Ok(())
}

fn parse_signal(s: &str) -> Result<i32> {
    let t = s.trim_start_matches("SIG").to_ascii_uppercase();
    let n = match t.as_str() {
        "KILL" => libc::SIGKILL,
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        other => other.parse().map_err(|_| {
            UserError::new(format!(
                "unknown signal '{s}': use a name like TERM or a number"
            ))
        })?,
    };
    Ok(n)
}

pub fn health(ctx: &Ctx, key: &str) -> Result<()> {
    let store = ctx.boxes()?;
    let rec = store.observe(store.resolve(key)?);
    let Some(sock) = rec.agent_socket.clone().filter(|_| rec.state.is_running()) else {
        return Err(UserError::with_code(format!("box '{}' is not running", rec.name), 1).into());
    };
    let limit = Duration::from_secs(10);
    let healthy = ctx
        .tokio()?
        .block_on(async {
            let check = async {
                let c = AgentClient::connect_unix(&sock).await?;
                c.health().await.map_err(anyhow::Error::from)
            };
            tokio::time::timeout(limit, check)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {limit:?}")))
        })
        .map_err(|e| {
            UserError::with_code(format!("unhealthy: {}", describe_agent_error(&rec, &e)), 1)
        })?;
    if healthy {
        println!("healthy");
        Ok(())
    } else {
        Err(UserError::with_code("unhealthy", 1).into())
    }
}

pub fn cp(ctx: &Ctx, src: &str, dst: &str) -> Result<()> {
    let store = ctx.boxes()?;
    let split = |s: &str| -> Option<(String, String)> {
        let (b, p) = s.split_once(':')?;
        (!b.is_empty() && !b.contains('/') && p.starts_with('/'))
            .then(|| (b.to_string(), p.to_string()))
    };
    let rt = ctx.tokio()?;
    match (split(src), split(dst)) {
        (Some((b, p)), None) => {
            let sock = running_socket(&store, &b)?;
            rt.block_on(super::copy::copy_out(&sock, &p, Path::new(dst)))
        }
        (None, Some((b, p))) => {
            let sock = running_socket(&store, &b)?;
            rt.block_on(super::copy::copy_in(&sock, Path::new(src), &p))
        }
        _ => Err(UserError::new(
            "cp needs exactly one side as BOX:/absolute/path (e.g. microbox cp ./f web:/tmp/f)",
        )
        .into()),
    }
}

fn running_socket(store: &BoxStore, key: &str) -> Result<PathBuf> {
    let rec = store.observe(store.resolve(key)?);
    rec.agent_socket
        .filter(|_| rec.state.is_running())
        .ok_or_else(|| UserError::new(format!("box '{}' is not running", rec.name)).into())
}

pub fn stats(ctx: &Ctx, keys: &[String], no_stream: bool) -> Result<()> {
    super::stats::stats(ctx, keys, no_stream)
}

/// Image env first, overrides after; a later KEY replaces an earlier one in place.
pub fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kv in base.iter().chain(overrides) {
        let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
        if let Some(slot) = out
            .iter_mut()
            .find(|e| e.split_once('=').map(|(k, _)| k).unwrap_or(e) == key)
        {
            *slot = kv.clone();
        } else {
            out.push(kv.clone());
        }
    }
    out
}

/// `-e KEY` takes KEY from our own environment, like Docker; `-e KEY=V` is literal.
fn expand_env(items: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in items {
        if e.contains('=') {
            out.push(e.clone());
        } else if let Ok(v) = std::env::var(e) {
            out.push(format!("{e}={v}"));
        }
    }
    Ok(out)
}

fn read_env_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UserError::new(format!("cannot read env file {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('=') {
            return Err(UserError::new(format!(
                "{} line {}: expected KEY=VALUE, got '{line}'",
                path.display(),
                i + 1
            ))
            .into());
        }
        out.extend(expand_env(&[line.to_string()])?);
    }
    Ok(out)
}

fn box_config(root: &Path, args: &RunArgs) -> Result<BoxConfig> {
    let mut c = BoxConfig::new(args.image.clone());
    c.vcpus = args.cpus;
    c.memory_mib = parse_memory_mib(&args.memory).map_err(UserError::new)?;
    for f in &args.env_file {
        c.env.extend(read_env_file(f)?);
    }
    c.env.extend(expand_env(&args.env)?);
    c.working_dir = args.workdir.clone();
    c.user = args.user.clone();
    c.hostname = args.hostname.clone();
    c.boot_timeout = Duration::from_secs(args.boot_timeout);
    c.network = match args.network.as_str() {
        "user" | "default" | "bridge" | "slirp" => NetworkMode::User,
        "passt" => NetworkMode::Passt,
        "none" => NetworkMode::None,
        other => {
            return Err(UserError::new(format!(
                "unknown network '{other}': use user (QEMU's slirp), passt or none"
            ))
            .into())
        }
    };
    for v in &args.volume {
        c.volumes.push(parse_volume_or_named(root, v)?);
    }
    for p in &args.publish {
        c.ports.push(parse_port(p)?);
    }
    Ok(c)
}

/// Fails fast, before anything is created or booted, when a host port to publish is taken.
/// (The VMM binds it for real moments later; this check turns the common mistake into a clear
/// message instead of a failed boot.)
pub fn check_ports_free(ports: &[PortMapping]) -> Result<()> {
    for p in ports {
        let addr = std::net::SocketAddr::new(p.host_ip, p.host_port);
        let res = match p.protocol {
            Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
            Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
        };
        if let Err(e) = res {
            let proto = if p.protocol == Protocol::Tcp {
                "tcp"
            } else {
                "udp"
            };
            return Err(UserError::new(format!(
                "cannot publish {addr}/{proto}: {e} (choose another host port: -p OTHER:{})",
                p.guest_port
            ))
            .into());
        }
    }
    Ok(())
}

/// `microbox port BOX`: the published ports, as `GUEST/proto -> HOST_IP:HOST_PORT`.
pub fn port(ctx: &Ctx, key: &str) -> Result<()> {
    let store = ctx.boxes()?;
    let rec = store.resolve(key)?;
    for p in &rec.config.ports {
        let proto = if p.protocol == Protocol::Tcp {
            "tcp"
        } else {
            "udp"
        };
        println!(
            "{}/{proto} -> {}",
            p.guest_port,
            std::net::SocketAddr::new(p.host_ip, p.host_port)
        );
    }
    Ok(())
}

/// `NAME:GUEST[:ro]` with a volume name (no '/'): the named volume, created on first use as
/// Docker does; anything else is a bind mount of a host directory.
fn parse_volume_or_named(root: &Path, s: &str) -> Result<VolumeMount> {
    if let Some((name, rest)) = s.split_once(':') {
        if super::volume::is_volume_name(name) && !name.starts_with('.') {
            let vol = super::volume::ensure(root, name)?;
            return parse_volume(&format!("{}:{rest}", vol.mountpoint.display()));
        }
    }
    parse_volume(s)
}

/// `HOST:GUEST[:ro|:rw]`. A missing host directory is an error (not created as Docker does):
/// a typo should not silently share an empty directory.
pub fn parse_volume(s: &str) -> Result<VolumeMount> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, guest, ro) = match parts.as_slice() {
        [h, g] => (*h, *g, false),
        [h, g, "ro"] => (*h, *g, true),
        [h, g, "rw"] => (*h, *g, false),
        _ => {
            return Err(
                UserError::new(format!("invalid volume '{s}': expected HOST:GUEST[:ro]")).into(),
            )
        }
    };
    let host = PathBuf::from(host);
    let host = std::fs::canonicalize(&host).map_err(|e| {
        UserError::new(format!(
            "volume '{s}': host path {} is not usable: {e}",
            host.display()
        ))
    })?;
    if !host.is_dir() {
        return Err(UserError::new(format!(
            "volume '{s}': {} is not a directory",
            host.display()
        ))
        .into());
    }
    Ok(VolumeMount {
        host,
        guest: PathBuf::from(guest),
        read_only: ro,
    })
}

/// `[IP:]HOST:GUEST[/tcp|/udp]`; the host address defaults to 127.0.0.1 (documented: unlike
/// Docker's 0.0.0.0, a box is not exposed to the network unless asked).
pub fn parse_port(s: &str) -> Result<PortMapping> {
    let bad = || {
        UserError::new(format!(
            "invalid port mapping '{s}': expected [IP:]HOST:GUEST[/tcp|udp]"
        ))
    };
    let (spec, proto) = match s.rsplit_once('/') {
        Some((a, "tcp")) => (a, Protocol::Tcp),
        Some((a, "udp")) => (a, Protocol::Udp),
        Some(_) => return Err(bad().into()),
        None => (s, Protocol::Tcp),
    };
    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    let (guest, host, ip) = match parts.as_slice() {
        [g, h] => (*g, *h, "127.0.0.1"),
        [g, h, ip] => (*g, *h, *ip),
        _ => return Err(bad().into()),
    };
    let ip: IpAddr = ip
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| bad())?;
    Ok(PortMapping {
        host_ip: ip,
        host_port: host.parse().map_err(|_| bad())?,
        guest_port: guest.parse().map_err(|_| bad())?,
        protocol: proto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_overrides_in_place() {
        let base = vec!["PATH=/bin".to_string(), "A=1".into()];
        let over = vec!["A=2".to_string(), "B=3".into()];
        assert_eq!(merge_env(&base, &over), ["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn ports_parse_like_docker() {
        let p = parse_port("8080:80").unwrap();
        assert_eq!(
            (p.host_port, p.guest_port, p.protocol),
            (8080, 80, Protocol::Tcp)
        );
        assert_eq!(p.host_ip.to_string(), "127.0.0.1");
        let p = parse_port("0.0.0.0:53:53/udp").unwrap();
        assert_eq!(
            (p.host_ip.to_string().as_str(), p.protocol),
            ("0.0.0.0", Protocol::Udp)
        );
        for bad in ["80", "a:b", "1:2/sctp", "x:1:2"] {
            assert!(
                parse_port(bad).unwrap_err().to_string().contains(bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn volumes_need_an_existing_host_dir() {
        let d = tempfile::tempdir().unwrap();
        let v = parse_volume(&format!("{}:/data:ro", d.path().display())).unwrap();
        assert!(v.read_only);
        assert_eq!(v.guest, PathBuf::from("/data"));
        let err = parse_volume("/no/such/dir:/data").unwrap_err().to_string();
        assert!(err.contains("/no/such/dir"), "{err}");
        assert!(parse_volume("justone").is_err());
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("SIGKILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("BOGUS").is_err());
    }
}

//! Command implementations, grouped by what they touch: box records, the box lifecycle (VMs),
//! images, attestation, and host information.

pub mod attest;
pub mod boxes;
pub mod copy;
pub mod image;
pub mod info;
pub mod lifecycle;
pub mod observe;
pub mod stats;
pub mod volume;

use std::path::PathBuf;

use anyhow::Result;

use crate::boxes::BoxStore;
use crate::cli::{Cli, Command, ImageCommand, VolumeCommand};

/// What every command needs: where state lives.
pub struct Ctx {
    pub root: PathBuf,
}

impl Ctx {
    pub fn boxes(&self) -> Result<BoxStore> {
        BoxStore::open(&self.root)
    }

    /// A tokio runtime for commands that talk to registries, VMs or agents.
    pub fn tokio(&self) -> Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?)
    }
}

pub fn dispatch(cli: Cli) -> Result<()> {
    let root = cli
        .root
        .unwrap_or_else(microbox_runtime::paths::default_root);
    let ctx = Ctx { root };
    match cli.command {
        Command::Run(args) => lifecycle::run(&ctx, args, true),
        Command::Create(args) => lifecycle::run(&ctx, args, false),
        Command::Start { boxes, attach } => lifecycle::start(&ctx, &boxes, attach),
        Command::Stop { time, boxes } => lifecycle::stop(&ctx, &boxes, time),
        Command::Kill { signal, boxes } => lifecycle::kill(&ctx, &boxes, &signal),
        Command::Restart { time, boxes } => {
            lifecycle::stop(&ctx, &boxes, time)?;
            lifecycle::start(&ctx, &boxes, false)
        }
        Command::Rm { force, boxes } => boxes::rm(&ctx, &boxes, force),
        Command::Ps { all, quiet, format } => boxes::ps(&ctx, all, quiet, format),
        Command::Exec(args) => lifecycle::exec(&ctx, args),
        Command::Logs {
            follow,
            tail,
            timestamps,
            console,
            target,
        } => boxes::logs(&ctx, &target, follow, tail, timestamps, console),
        Command::Inspect { boxes } => boxes::inspect(&ctx, &boxes),
        Command::Port { target } => lifecycle::port(&ctx, &target),
        Command::Cp { src, dst } => lifecycle::cp(&ctx, &src, &dst),
        Command::Wait { boxes } => boxes::wait(&ctx, &boxes),
        Command::Stats { no_stream, boxes } => lifecycle::stats(&ctx, &boxes, no_stream),
        Command::Health { target } => lifecycle::health(&ctx, &target),
        Command::Pull {
            platform,
            reference,
        } => image::pull(&ctx, &reference, platform.as_deref()),
        Command::Images { format } | Command::Image(ImageCommand::Ls { format }) => {
            image::list(&ctx, format)
        }
        Command::Rmi { force, references } => image::remove(&ctx, &references, force),
        Command::Image(ImageCommand::Inspect { reference }) => image::inspect(&ctx, &reference),
        Command::Image(ImageCommand::Check) => image::check(&ctx),
        Command::Image(ImageCommand::Unpack { reference, dest }) => {
            image::unpack(&ctx, &reference, &dest)
        }
        Command::Image(ImageCommand::Import { path, reference }) => {
            image::import(&ctx, &path, reference.as_deref())
        }
        Command::Image(ImageCommand::Prune) => image::prune(&ctx),
        Command::Login {
            server,
            username,
            password,
            password_stdin,
        } => image::login(&ctx, &server, &username, password, password_stdin),
        Command::Logout { server } => image::logout(&ctx, &server),
        Command::Volume(VolumeCommand::Create { name }) => volume::create(&ctx, &name),
        Command::Volume(VolumeCommand::Ls { format }) => volume::list(&ctx, format),
        Command::Volume(VolumeCommand::Inspect { name }) => volume::inspect(&ctx, &name),
        Command::Volume(VolumeCommand::Rm { names }) => volume::remove(&ctx, &names),
        Command::Attest(args) => attest::attest(&ctx, args),
        Command::Events {
            format,
            since,
            until,
        } => observe::events(&ctx, format, since.as_deref(), until.as_deref()),
        Command::Metrics { listen } => observe::metrics(&ctx, listen.as_deref()),
        Command::Info => info::info(&ctx),
        Command::Version => info::version(),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "microbox",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Supervise { id } => crate::supervise::supervise(&ctx, &id),
    }
}

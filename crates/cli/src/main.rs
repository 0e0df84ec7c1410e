//! `microbox`: the Docker-like command line of microbox.
//!
//! Exit codes follow Docker's: 125 when microbox itself fails, 126 when the command cannot be
//! run, 127 when it is not found, otherwise the workload's own exit code.

mod boxes;
mod cli;
mod commands;
mod logs;
mod progress;
mod supervise;

use std::process::ExitCode;

use clap::Parser;

/// A failure the user can fix: printed as one line, without a chain of causes.
#[derive(Debug)]
pub struct UserError {
    message: String,
    code: u8,
}

impl UserError {
    pub fn new(message: impl Into<String>) -> Self {
        UserError {
            message: message.into(),
            code: 125,
        }
    }

    pub fn with_code(message: impl Into<String>, code: u8) -> Self {
        UserError {
            message: message.into(),
            code,
        }
    }
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

/// The workload's own exit status, passed through as ours.
#[derive(Debug)]
pub struct WorkloadExit(pub u8);

impl std::fmt::Display for WorkloadExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "workload exited with {}", self.0)
    }
}

impl std::error::Error for WorkloadExit {}

fn main() -> ExitCode {
    // When the runtime re-executes us as the libkrun VMM, run the VM and never return.
    microbox_runtime::hypervisor::krun::shim_main_if_requested();
    let cli = cli::Cli::parse();
    let filter = if cli.debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MICROBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(w) = e.downcast_ref::<WorkloadExit>() {
                return ExitCode::from(w.0);
            }
            if let Some(u) = e.downcast_ref::<UserError>() {
                eprintln!("microbox: {u}");
                return ExitCode::from(u.code);
            }
            // Unexpected: show the whole chain on one line, outermost first.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("microbox: {}", chain.join(": "));
            ExitCode::from(125)
        }
    }
}

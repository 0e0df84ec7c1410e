//! The gRPC `microbox.agent.v1.Agent` service: maps each RPC onto the exec, files, stats and
//! attestation modules and turns their failures into status codes.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use microbox_agent_proto::v1::agent_server::Agent;
use microbox_agent_proto::v1::{
    exec_request, AttestationReportRequest, AttestationReportResponse, ExecRequest, ExecResponse,
    FileFormat, ReadFileChunk, ReadFileRequest, ResizeTtyRequest, ResizeTtyResponse,
    ShutdownRequest, ShutdownResponse, SignalRequest, SignalResponse, StatsRequest, StatsResponse,
    WriteFileRequest, WriteFileResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::attest::{self, AttestError};
use crate::exec::{self, ExecContext, ProcTable};
use crate::files;
use crate::reaper::Reaper;

pub struct AgentService {
    exec: ExecContext,
    /// Told when a Shutdown was accepted; main stops serving and powers off (or exits).
    shutdown: mpsc::Sender<()>,
}

impl AgentService {
    /// The processes started by Exec (main signals them on shutdown).
    pub fn procs(&self) -> Arc<ProcTable> {
        self.exec.procs.clone()
    }

    pub fn new(
        root: PathBuf,
        reaper: Arc<Reaper>,
        shutdown: mpsc::Sender<()>,
        mount_ns: Option<std::os::fd::OwnedFd>,
        cgroup_procs: Option<std::os::fd::OwnedFd>,
    ) -> Self {
        AgentService {
            exec: ExecContext {
                root,
                reaper,
                procs: Arc::new(ProcTable::default()),
                mount_ns: mount_ns.map(Arc::new),
                cgroup_procs: cgroup_procs.map(Arc::new),
            },
            shutdown,
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type ExecStream = BoxStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?;
        let start = match first.and_then(|r| r.msg) {
            Some(exec_request::Msg::Start(s)) => s,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first Exec message must be `start`",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "the Exec stream ended before a `start` message",
                ))
            }
        };
        let rx = exec::start(&self.exec, &start, inbound)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn signal(
        &self,
        request: Request<SignalRequest>,
    ) -> Result<Response<SignalResponse>, Status> {
        let r = request.into_inner();
        self.exec.procs.signal(r.pid, r.signal, r.group)?;
        Ok(Response::new(SignalResponse {}))
    }

    async fn resize_tty(
        &self,
        request: Request<ResizeTtyRequest>,
    ) -> Result<Response<ResizeTtyResponse>, Status> {
        let r = request.into_inner();
        self.exec.procs.resize(r.pid, r.rows, r.cols)?;
        Ok(Response::new(ResizeTtyResponse {}))
    }

    type ReadFileStream = BoxStream<ReadFileChunk>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let r = request.into_inner();
        let format = FileFormat::try_from(r.format)
            .map_err(|_| Status::invalid_argument(format!("unknown file format {}", r.format)))?;
        let rx = files::read(&self.exec.root, &r.path, format)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let bytes_written = files::write(&self.exec.root, request.into_inner()).await?;
        Ok(Response::new(WriteFileResponse { bytes_written }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let s = tokio::task::spawn_blocking(|| crate::stats::read(std::path::Path::new("/proc")))
            .await
            .map_err(|e| Status::internal(format!("stats task failed: {e}")))?
            .map_err(|e| Status::internal(format!("reading /proc: {e}")))?;
        Ok(Response::new(s))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        // try_send: a second Shutdown while one is in progress is simply accepted.
        let _ = self.shutdown.try_send(());
        Ok(Response::new(ShutdownResponse {}))
    }

    async fn get_attestation_report(
        &self,
        request: Request<AttestationReportRequest>,
    ) -> Result<Response<AttestationReportResponse>, Status> {
        let data = request.into_inner().report_data;
        let r = tokio::task::spawn_blocking(move || attest::get_report(&data))
            .await
            .map_err(|e| Status::internal(format!("attestation task failed: {e}")))?;
        match r {
            Ok(r) => Ok(Response::new(AttestationReportResponse {
                report: r.report,
                certs: r.certs,
                provider: r.provider.to_string(),
            })),
            Err(AttestError::NoTee) => Err(Status::failed_precondition("no TEE in this VM")),
            Err(AttestError::BadReportData(n)) => Err(Status::invalid_argument(format!(
                "report_data must be exactly {} bytes, got {n}",
                attest::REPORT_DATA_LEN
            ))),
            Err(AttestError::Failed(m)) => Err(Status::internal(m)),
        }
    }
}

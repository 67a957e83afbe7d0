//! Peer transport benchmark (not a test): run by `scripts/bench-transport.sh`, reported in
//! `docs/BENCHMARKS.md` ("Peer transport: what one blob push costs").
//!
//! ```text
//! transport-bench [KIB] [CALLS] [CONCURRENCY]
//! ```
//!
//! Sends `CALLS` blobs of `KIB` KiB, `CONCURRENCY` at a time, from this process to a server
//! process it starts (this executable again, on loopback), once per transport:
//!
//! - `grpc`: `Cluster.PushSmallBlob` through tonic, with the flow-control settings the
//!   nodes use between peers (`node/src/cluster/peers.rs`) and TCP_NODELAY on both ends:
//!   what a node pays today to push a new blob to a peer;
//! - `http1`: a `PUT` of the bytes through hyper's HTTP/1.1 client (a keep-alive pool) and
//!   server, the digests in headers;
//! - `tcp`: the reference, no protocol at all: a 4-byte length, the bytes, a 1-byte reply,
//!   on one connection per concurrent sender.
//!
//! Each server drops what it receives, so the figures are the transport's own cost: the
//! CPU time (user + system, `/proc/PID/stat`) of the sending and the receiving process per
//! call, and calls per second. One JSON line per transport on stdout.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use granary_cluster_tests::bench::{arg, cpu_ms};
use granary_protocol::pb;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status, Streaming};

/// The nodes' peer flow-control settings (`node/src/cluster/peers.rs`).
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;

const TRANSPORTS: [&str; 3] = ["grpc", "http1", "tcp"];

/// Answers `PushSmallBlob` by dropping the bytes; every other call is unimplemented.
struct Sink;

type NoStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not part of the benchmark"))
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Sink {
    async fn push_small_blob(
        &self,
        request: Request<pb::BlobChunk>,
    ) -> Result<Response<pb::PushBlobReply>, Status> {
        std::hint::black_box(request.into_inner().data);
        Ok(Response::new(pb::PushBlobReply { stored: true }))
    }

    async fn propose(
        &self,
        _: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        unimplemented()
    }
    async fn read_index(
        &self,
        _: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        unimplemented()
    }
    async fn join(
        &self,
        _: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        unimplemented()
    }
    async fn change_membership(
        &self,
        _: Request<pb::MembershipRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        unimplemented()
    }
    async fn push_blob(
        &self,
        _: Request<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::PushBlobReply>, Status> {
        unimplemented()
    }
    type PullBlobStream = NoStream<pb::BlobChunk>;
    async fn pull_blob(
        &self,
        _: Request<pb::BlobRef>,
    ) -> Result<Response<Self::PullBlobStream>, Status> {
        unimplemented()
    }
    async fn has_blob(
        &self,
        _: Request<pb::BlobRef>,
    ) -> Result<Response<pb::HasBlobReply>, Status> {
        unimplemented()
    }
    type FetchUpstreamStream = NoStream<pb::UpstreamChunk>;
    async fn fetch_upstream(
        &self,
        _: Request<pb::UpstreamRequest>,
    ) -> Result<Response<Self::FetchUpstreamStream>, Status> {
        unimplemented()
    }
    async fn leave(
        &self,
        _: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        unimplemented()
    }
}

async fn serve(transport: &str, listener: TcpListener) {
    match transport {
        "grpc" => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .add_service(
                    pb::cluster_server::ClusterServer::new(Sink)
                        .max_decoding_message_size(64 << 20),
                )
                .serve_with_incoming(incoming)
                .await
                .expect("gRPC server");
        }
        "http1" => loop {
            let (socket, _) = listener.accept().await.expect("accept");
            socket.set_nodelay(true).expect("TCP_NODELAY");
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        std::hint::black_box(body);
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::new())))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        },
        _ => loop {
            let (mut socket, _) = listener.accept().await.expect("accept");
            socket.set_nodelay(true).expect("TCP_NODELAY");
            tokio::spawn(async move {
                while let Ok(len) = socket.read_u32().await {
                    let mut buf = BytesMut::with_capacity(len as usize);
                    while buf.len() < len as usize {
                        match socket.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                    std::hint::black_box(buf.freeze());
                    if socket.write_u8(1).await.is_err() {
                        return;
                    }
                }
            });
        },
    }
}

/// The digests travel with every push; their values do not matter here.
fn chunk(data: &Bytes) -> pb::BlobChunk {
    pb::BlobChunk {
        sha256: "a".repeat(64),
        data: data.clone(),
        size: data.len() as u64,
        md5: "b".repeat(32),
        sha1: "c".repeat(40),
        sha512: "d".repeat(128),
        crc32c: Some(0),
    }
}

/// `calls` sends by `concurrency` tasks; returns when every one is answered.
async fn send(transport: &str, addr: SocketAddr, data: Bytes, calls: u64, concurrency: u64) {
    let per_task = calls / concurrency;
    let mut tasks = Vec::new();
    match transport {
        "grpc" => {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("gRPC connect");
            for _ in 0..concurrency {
                let mut client = pb::cluster_client::ClusterClient::new(channel.clone())
                    .max_encoding_message_size(64 << 20);
                let data = data.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per_task {
                        client.push_small_blob(chunk(&data)).await.expect("push");
                    }
                }));
            }
        }
        "http1" => {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
            for _ in 0..concurrency {
                let client = client.clone();
                let data = data.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per_task {
                        let c = chunk(&data);
                        let req = hyper::Request::put(format!("http://{addr}/blob/{}", c.sha256))
                            .header("x-md5", c.md5)
                            .header("x-sha1", c.sha1)
                            .header("x-sha512", c.sha512)
                            .header("x-crc32c", "0")
                            .body(Full::new(c.data))
                            .expect("request");
                        let reply = client.request(req).await.expect("PUT");
                        reply.into_body().collect().await.expect("reply body");
                    }
                }));
            }
        }
        _ => {
            for _ in 0..concurrency {
                let data = data.clone();
                tasks.push(tokio::spawn(async move {
                    let mut socket = TcpStream::connect(addr).await.expect("connect");
                    socket.set_nodelay(true).expect("TCP_NODELAY");
                    for _ in 0..per_task {
                        socket.write_u32(data.len() as u32).await.expect("write");
                        socket.write_all(&data).await.expect("write");
                        socket.read_u8().await.expect("reply");
                    }
                }));
            }
        }
    }
    for t in tasks {
        t.await.expect("sender task");
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        let listener = TcpListener::bind(&args[3]).await.expect("bind");
        return serve(&args[2], listener).await;
    }
    let kib = arg(1, 100);
    let calls = arg(2, 20_000);
    let concurrency = arg(3, 4).max(1);
    let data = Bytes::from(
        (0..kib * 1024)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    for transport in TRANSPORTS {
        let addr: SocketAddr = {
            // A free port for the server; it binds the same one right after.
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            probe.local_addr().expect("address")
        };
        let mut server = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args(["serve", transport, &addr.to_string()])
            .spawn()
            .expect("server process");
        // Wait until it listens.
        while TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A warm-up tenth, then the measured calls.
        send(transport, addr, data.clone(), calls / 10, concurrency).await;
        let (client0, server0, t0) = (cpu_ms(0), cpu_ms(server.id()), Instant::now());
        send(transport, addr, data.clone(), calls, concurrency).await;
        let (client1, server1, secs) = (cpu_ms(0), cpu_ms(server.id()), t0.elapsed());
        let _ = server.kill();
        let _ = server.wait();
        let per_call_us =
            |a: Option<f64>, b: Option<f64>| b.zip(a).map(|(b, a)| (b - a) * 1e3 / calls as f64);
        let sender = per_call_us(client0, client1);
        let receiver = per_call_us(server0, server1);
        println!(
            "{}",
            json!({
                "transport": transport,
                "kib": kib,
                "calls": calls,
                "concurrency": concurrency,
                "per_second": (calls as f64 / secs.as_secs_f64()).round(),
                "sender_cpu_us_per_call": sender.map(|v| v.round()),
                "receiver_cpu_us_per_call": receiver.map(|v| v.round()),
                "total_cpu_us_per_call": sender.zip(receiver).map(|(a, b)| (a + b).round()),
            })
        );
    }
}

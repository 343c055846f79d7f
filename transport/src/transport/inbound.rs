//! What comes in: the accept loop (TLS handshakes, identity from the certificate), one task
//! per connection accepting the peer's streams, and one per stream — Raft batch streams
//! (decoded, checked, handed to the node), requests (answered through a responder) and
//! large transfers.

use super::*;

pub(super) fn peer_identity(conn: &Connection) -> Result<PeerIdentity, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or_else(|| "no peer certificate".to_string())?;
    let first = certs.first().ok_or_else(|| "empty peer certificate chain".to_string())?;
    identity_of_cert(first).map_err(|e| e.to_string())
}

pub(super) async fn run_accept(shared: Arc<Shared>) {
    let mut shutdown_rx = shared.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            incoming = shared.endpoint.accept() => incoming,
            _ = shutdown_rx.changed() => return,
        };
        let Some(incoming) = incoming else { return };
        let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
            shared.handshakes_refused.fetch_add(1, Ordering::Relaxed);
            warn!(node = %shared.config.node, remote = %incoming.remote_address(), "refused connection: too many handshakes in progress");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let handshake = Duration::from_millis(shared.config.timing.handshake_timeout_ms);
            let result = match incoming.accept() {
                Ok(connecting) => match tokio::time::timeout(handshake, connecting).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("handshake timed out".to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            drop(permit);
            let conn = match result {
                Ok(conn) => conn,
                Err(reason) => {
                    shared.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    warn!(node = %shared.config.node, %remote, %reason, "refused connection: TLS handshake failed");
                    return;
                }
            };
            let refuse = |reason: String| {
                shared.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                warn!(node = %shared.config.node, %remote, %reason, "refused connection");
                conn.close(codes::CLOSE_IDENTITY_REFUSED, reason.as_bytes());
            };
            let identity = match peer_identity(&conn) {
                Ok(identity) => identity,
                Err(reason) => return refuse(format!("certificate identity: {reason}")),
            };
            match identity {
                PeerIdentity::Node(id) if id == shared.config.node => {
                    refuse(format!("peer claims to be this node n{id}"))
                }
                PeerIdentity::Node(id) if id > shared.config.node => {
                    // The lower id dials, so this is not the pair's connection: it may carry
                    // requests only (a node asking to join, before anyone knows its address),
                    // and a Raft or transfer stream on it closes it.
                    debug!(node = %shared.config.node, peer = %id, %remote, "higher node connected for requests only");
                    run_connection(shared.clone(), PeerIdentity::Node(id), None, conn).await;
                }
                PeerIdentity::Node(id) => match shared.peer(id) {
                    Ok(peer) => {
                        let generation = shared.install(&peer, conn.clone());
                        info!(node = %shared.config.node, peer = %id, %remote, "peer connected");
                        run_connection(shared.clone(), PeerIdentity::Node(id), Some(peer.clone()), conn).await;
                        shared.uninstall(&peer, generation);
                    }
                    Err(e) => refuse(e.to_string()),
                },
                PeerIdentity::Client(client) => {
                    match &client.grant {
                        Some(grant) => {
                            debug!(node = %shared.config.node, client = %client.name, role = %grant.role, %remote, "client connected")
                        }
                        None if shared.config.require_client_roles => {
                            refuse(format!(
                                "client {} has a certificate without a role (require_client_roles)",
                                client.name
                            ));
                            return;
                        }
                        // The compatibility rule (crate::cert): loud, since it grants everything.
                        None => warn!(
                            node = %shared.config.node, client = %client.name, %remote,
                            "client certificate carries no role: treated as admin for compatibility; \
                             reissue it with `flotilla cert client --role ...`"
                        ),
                    }
                    run_connection(shared.clone(), PeerIdentity::Client(client), None, conn).await;
                }
            }
        });
    }
}

/// Serves the streams the peer opens on `conn` until the connection ends.
pub(super) async fn run_connection(shared: Arc<Shared>, from: PeerIdentity, peer: Option<Arc<Peer>>, conn: Connection) {
    // Pipelined requests answered at once, all pipes of this connection together (the bound
    // streams of their own have from the QUIC stream limit).
    let pipe_slots = Arc::new(Semaphore::new(super::inbound_pipe::PIPE_IN_FLIGHT_MAX));
    loop {
        if let Some(delay) = shared.accept_delay() {
            tokio::time::sleep(delay).await;
        }
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let Some(peer) = peer.clone() else {
                        warn!(node = %shared.config.node, peer = %from, "closing connection: Raft or transfer stream on a request-only connection");
                        conn.close(codes::CLOSE_PROTOCOL, b"clients may only send requests");
                        return;
                    };
                    tokio::spawn(run_uni_stream(shared.clone(), peer, conn.clone(), recv));
                }
                Err(e) => {
                    debug!(node = %shared.config.node, peer = %from, error = %e, "connection closed");
                    return;
                }
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let slots = pipe_slots.clone();
                    tokio::spawn(run_request_stream(shared.clone(), from.clone(), peer.clone(), conn.clone(), send, recv, slots));
                }
                Err(e) => {
                    debug!(node = %shared.config.node, peer = %from, error = %e, "connection closed");
                    if let Some(peer) = &peer {
                        take_up_remaining_uni_streams(&shared, peer, &conn).await;
                    }
                    return;
                }
            },
        }
    }
}

/// Takes up the unidirectional streams a closed connection still holds. A peer that shuts
/// down closes the connection once we acknowledged its streams' data, which may be before
/// this task took them up; quinn hands such streams over after the close, their readers get
/// the data received before it (after a flushed shutdown, all of it), and a task that stopped
/// at its first failed accept (of a bidirectional stream: the `select!` picks either) would
/// drop them.
async fn take_up_remaining_uni_streams(shared: &Arc<Shared>, peer: &Arc<Peer>, conn: &Connection) {
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(run_uni_stream(shared.clone(), peer.clone(), conn.clone(), recv));
    }
}

pub(super) async fn run_uni_stream(shared: Arc<Shared>, peer: Arc<Peer>, conn: Connection, mut recv: RecvStream) {
    let from = PeerIdentity::Node(peer.id);
    let frame_max = shared.config.limits.frame_bytes_max;
    let header = match read_frame_exact(&mut recv, frame_max).await {
        Ok(Some(frame)) if frame.kind == FrameKind::StreamOpen => decode_stream_header(&frame.payload),
        Ok(Some(_)) => Err(FrameError::Malformed("stream does not start with a StreamOpen frame")),
        Ok(None) => return,
        Err(ReadFail::Frame(e)) => Err(e),
        Err(ReadFail::Stream(_)) => return,
    };
    match header {
        Err(error) => shared.reject_frame(Some(&peer), &from, &conn, &error),
        Ok(StreamHeader::Raft { index }) => {
            debug!(node = %shared.config.node, peer = %peer.id, index, "raft stream opened");
            read_raft_stream(&shared, &peer, &conn, recv).await;
        }
        Ok(StreamHeader::Transfer { group }) => {
            if shared.blocked(peer.id) {
                add(&peer.counters.transfers_refused, 1);
                stop_refused(&mut recv);
                return;
            }
            let Ok(permit) = peer.transfers_in.clone().try_acquire_owned() else {
                add(&peer.counters.transfers_refused, 1);
                warn!(node = %shared.config.node, peer = %peer.id, %group, "refused transfer: too many from this peer");
                stop_refused(&mut recv);
                return;
            };
            add(&peer.counters.transfers_received, 1);
            let transfer = IncomingTransfer {
                from: peer.id,
                group,
                recv,
                received_bytes: 0,
                bytes_max: shared.config.limits.transfer_bytes_max,
                _permit: permit,
            };
            if let Err(mpsc::error::SendError(mut transfer)) = shared.transfers_tx.send(transfer).await {
                add(&peer.counters.transfers_refused, 1);
                stop_refused(&mut transfer.recv);
            }
        }
    }
}

pub(super) async fn read_raft_stream(shared: &Shared, peer: &Peer, conn: &Connection, mut recv: RecvStream) {
    let from = PeerIdentity::Node(peer.id);
    let mut decoder = FrameDecoder::new(shared.config.limits.frame_bytes_max);
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return,
            Err(e) => {
                debug!(node = %shared.config.node, peer = %peer.id, error = %e, "raft stream ended");
                return;
            }
        };
        add(&peer.counters.bytes_received, chunk.len() as u64);
        decoder.handle_bytes(&chunk);
        loop {
            let frame = match decoder.poll_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => return shared.reject_frame(Some(peer), &from, conn, &error),
            };
            if frame.kind != FrameKind::Batch {
                let error = FrameError::Malformed("only batch frames may follow on a raft stream");
                return shared.reject_frame(Some(peer), &from, conn, &error);
            }
            let envelopes = match decode_batch(frame.payload) {
                Ok(envelopes) => envelopes,
                Err(error) => return shared.reject_frame(Some(peer), &from, conn, &error),
            };
            add(&peer.counters.batches_received, 1);
            if shared.blocked(peer.id) {
                add(&peer.counters.fault_drops, envelopes.len() as u64);
                continue;
            }
            for envelope in envelopes {
                // Waiting here when the node is behind applies QUIC backpressure to the peer.
                if shared.envelopes_tx.send((peer.id, envelope)).await.is_err() {
                    return;
                }
                add(&peer.counters.envelopes_received, 1);
            }
        }
    }
}

pub(super) async fn run_request_stream(
    shared: Arc<Shared>,
    from: PeerIdentity,
    peer: Option<Arc<Peer>>,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    pipe_slots: Arc<Semaphore>,
) {
    let frame_max = shared.config.limits.frame_bytes_max;
    let body = match read_frame_exact(&mut recv, frame_max).await {
        Ok(Some(frame)) if frame.kind == FrameKind::Request => frame.payload,
        Ok(Some(frame)) if frame.kind == FrameKind::PipeRequest => {
            return super::inbound_pipe::run_pipe(shared, from, peer, conn, (send, recv), frame.payload, pipe_slots)
                .await;
        }
        Ok(Some(_)) => {
            let error = FrameError::Malformed("a request stream must start with a Request frame");
            return shared.reject_frame(peer.as_deref(), &from, &conn, &error);
        }
        Ok(None) | Err(ReadFail::Stream(_)) => return,
        Err(ReadFail::Frame(error)) => return shared.reject_frame(peer.as_deref(), &from, &conn, &error),
    };
    if let Some(peer) = &peer {
        if shared.blocked(peer.id) {
            stop_refused(&mut recv);
            let _ = send.reset(codes::STREAM_REFUSED);
            return;
        }
        add(&peer.counters.requests_received, 1);
    }
    let mut frame = BytesMut::new();
    match answer_payload(answer_request(&shared, from, body).await, frame_max) {
        Ok(body) => encode_frame(FrameKind::Response, &body, &mut frame),
        Err(reason) => encode_frame(FrameKind::ResponseError, &reason, &mut frame),
    }
    if send.write_chunk(frame.freeze()).await.is_ok() {
        let _ = send.finish();
        // Keep the stream until the requester has the answer (or the connection ends).
        let _ = send.stopped().await;
    }
}

/// Hands one request to the node (its handler, or else its queue) and waits for its answer,
/// within the handler timeout (an unanswered request gets an error rather than holding its
/// stream).
pub(super) async fn answer_request(shared: &Shared, from: PeerIdentity, body: Bytes) -> Result<Bytes, String> {
    let (tx, rx) = oneshot::channel();
    let handler_timeout = Duration::from_millis(shared.config.timing.request_handler_timeout_ms);
    let request = IncomingRequest { from, body, responder: Responder { tx } };
    let dropped = |_| "the node dropped the request".to_string();
    let late = || "the node did not answer in time".to_string();
    let Some(handler) = shared.handler.get() else {
        return tokio::time::timeout(handler_timeout, async {
            shared.requests_tx.send(request).await.map_err(|_| "the node does not take requests".to_string())?;
            rx.await.map_err(dropped)?
        })
        .await
        .unwrap_or_else(|_| Err(late()));
    };
    let mut serving = handler.serve(request);
    let deadline = tokio::time::sleep(handler_timeout);
    tokio::pin!(rx, deadline);
    // Most often the work ends with its answer: both are ready at once, and nothing is left.
    let answered = tokio::select! {
        biased;
        () = until_done_or_panicked(&mut serving) => None,
        answer = &mut rx => Some(answer.map_err(dropped).and_then(|a| a)),
        () = &mut deadline => Some(Err(late())),
    };
    match answered {
        None => {
            // Dropped first: work that panicked still holds the responder, and the error
            // answer its drop makes is what the requester gets. Work that ended and handed
            // its responder to someone else is still bound by the deadline.
            drop(serving);
            tokio::select! {
                answer = &mut rx => answer.map_err(dropped)?,
                () = &mut deadline => Err(late()),
            }
        }
        Some(answer) => {
            // Answered (or given up on) with work still to do: it finishes on its own.
            tokio::spawn(serving);
            answer
        }
    }
}

/// Polls `serving` until it ends or panics. A handler's panic is its request's failure,
/// answered at once with an error as it would be from a task of its own, not a silent end of
/// the transport's task serving it (which would leave the requester waiting for its deadline).
async fn until_done_or_panicked(serving: &mut Serving) {
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serving.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => std::task::Poll::Ready(()),
        }
    })
    .await
}

/// What goes back for `answer`: the body, if its frame fits `frame_max`; otherwise the error's
/// reason, cut to [`ERROR_REASON_BYTES_MAX`].
pub(super) fn answer_payload(answer: Result<Bytes, String>, frame_max: usize) -> Result<Bytes, Bytes> {
    match answer {
        Ok(body) if body.len() + FRAME_HEADER_BYTES <= frame_max => Ok(body),
        Ok(_) => Err(Bytes::from_static(b"response exceeds frame_bytes_max")),
        Err(reason) => Err(Bytes::copy_from_slice(truncate(&reason, ERROR_REASON_BYTES_MAX))),
    }
}

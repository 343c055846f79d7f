//! What goes out: the dialer of each peer with a higher id (connect, wait for the connection
//! to end, redial with backoff) and the writer of each peer, which drains its queue into
//! batch frames on the K long-lived Raft streams (`group % K`).

use super::inbound::{peer_identity, run_connection};
use super::*;

pub(super) async fn run_dialer(shared: Arc<Shared>, peer: Arc<Peer>) {
    let timing = &shared.config.timing;
    let backoff_min = Duration::from_millis(timing.reconnect_backoff_ms_min);
    let backoff_max = Duration::from_millis(timing.reconnect_backoff_ms_max);
    let mut backoff = backoff_min;
    let mut addr_rx = peer.addr.subscribe();
    let mut shutdown_rx = shared.shutdown.subscribe();
    let server_name = node_name(peer.id);
    loop {
        if *shutdown_rx.borrow_and_update() {
            return;
        }
        let addr = *addr_rx.borrow_and_update();
        let Some(addr) = addr else {
            tokio::select! {
                changed = addr_rx.changed() => if changed.is_err() { return },
                _ = shutdown_rx.changed() => return,
            }
            continue;
        };
        let attempt = async {
            let config = lock(&shared.dial_config).clone();
            let connecting = shared.endpoint.connect_with(config, addr, &server_name).map_err(|e| e.to_string())?;
            match tokio::time::timeout(Duration::from_millis(timing.handshake_timeout_ms), connecting).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err("handshake timed out".to_string()),
            }
        };
        let result = tokio::select! {
            result = attempt => result,
            _ = shutdown_rx.changed() => return,
        };
        let checked = result.and_then(|conn| match peer_identity(&conn) {
            Ok(PeerIdentity::Node(id)) if id == peer.id => Ok(conn),
            Ok(other) => {
                conn.close(codes::CLOSE_IDENTITY_REFUSED, b"unexpected identity");
                Err(format!("peer at {addr} is {other}, expected {}", peer.id))
            }
            Err(reason) => Err(reason),
        });
        match checked {
            Ok(conn) => {
                backoff = backoff_min;
                let generation = shared.install(&peer, conn.clone());
                info!(node = %shared.config.node, peer = %peer.id, %addr, "connected to peer");
                run_connection(shared.clone(), PeerIdentity::Node(peer.id), Some(peer.clone()), conn).await;
                shared.uninstall(&peer, generation);
                debug!(node = %shared.config.node, peer = %peer.id, "connection ended; redialing");
            }
            Err(reason) => {
                shared.dials_failed.fetch_add(1, Ordering::Relaxed);
                warn!(node = %shared.config.node, peer = %peer.id, %addr, %reason, "dial failed");
            }
        }
        // Wait before the next attempt; a new address cuts the wait short.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = addr_rx.changed() => {}
            _ = shutdown_rx.changed() => return,
        }
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// What ended a writer's work on one connection.
pub(super) enum WriteEnd {
    Shutdown,
    ConnectionChanged,
    Failed(String),
}

pub(super) async fn run_writer(shared: Arc<Shared>, peer: Arc<Peer>) {
    let mut conn_rx = peer.conn.subscribe();
    let mut shutdown_rx = shared.shutdown.subscribe();
    loop {
        let slot = loop {
            if let Some(slot) = conn_rx.borrow_and_update().clone() {
                break slot;
            }
            if *shutdown_rx.borrow_and_update() {
                return;
            }
            tokio::select! {
                changed = conn_rx.changed() => if changed.is_err() { return },
                _ = shutdown_rx.changed() => {}
            }
        };
        let k = usize::from(shared.config.raft_streams);
        let mut streams: Vec<Option<SendStream>> = (0..k).map(|_| None).collect();
        let end = write_loop(&shared, &peer, &slot.conn, &mut streams, &mut conn_rx, &mut shutdown_rx).await;
        match end {
            WriteEnd::Shutdown => {
                for stream in streams.iter_mut().flatten() {
                    let _ = stream.finish();
                }
                for stream in streams.iter_mut().flatten() {
                    let _ = stream.stopped().await;
                }
                return;
            }
            WriteEnd::ConnectionChanged => {}
            WriteEnd::Failed(reason) => {
                debug!(node = %shared.config.node, peer = %peer.id, %reason, "write failed; waiting for a new connection");
                // Wait for the slot to change (the connection task clears it when it ends).
                loop {
                    let current = conn_rx.borrow_and_update().as_ref().map(|s| s.generation);
                    if current != Some(slot.generation) {
                        break;
                    }
                    tokio::select! {
                        changed = conn_rx.changed() => if changed.is_err() { return },
                        _ = shutdown_rx.changed() => return,
                    }
                }
            }
        }
    }
}

/// The Raft stream of a group: fixed, so a group's envelopes stay in order.
pub(super) fn stream_index(group: GroupId, k: usize) -> usize {
    (group.0 % k as u64) as usize
}

/// Takes ready envelopes from the front of the queue until the next one would push its
/// stream's frame past `batch_bytes_max` (a frame always takes at least one envelope), so one
/// flush writes at most K frames of at most `batch_bytes_max` each. Returns the envelopes and,
/// if the front is delayed by fault injection, when it becomes ready. Envelopes are only
/// moved here; frames are built outside the queue lock.
pub(super) fn take_batch(peer: &Peer, k: usize, batch_bytes_max: usize) -> (Vec<Envelope>, Option<Instant>) {
    let mut queue = lock(&peer.queue);
    let now = Instant::now();
    let mut batch = Vec::new();
    let mut frame_bytes = vec![0usize; k];
    while let Some(front) = queue.items.front() {
        if let Some(ready_at) = front.ready_at {
            if ready_at > now {
                return (batch, Some(ready_at));
            }
        }
        let wire = envelope_wire_bytes(&front.envelope);
        let frame = &mut frame_bytes[stream_index(front.envelope.group, k)];
        if *frame > 0 && *frame + wire > batch_bytes_max {
            break;
        }
        *frame = if *frame == 0 { FRAME_HEADER_BYTES + wire } else { *frame + wire };
        if let Some(item) = queue.items.pop_front() {
            queue.payload_bytes -= item.envelope.payload.len();
            batch.push(item.envelope);
        }
    }
    (batch, None)
}

pub(super) async fn write_loop(
    shared: &Shared,
    peer: &Peer,
    conn: &Connection,
    streams: &mut [Option<SendStream>],
    conn_rx: &mut watch::Receiver<Option<ConnSlot>>,
    shutdown_rx: &mut watch::Receiver<bool>,
) -> WriteEnd {
    let k = streams.len();
    let batch_bytes_max = shared.config.limits.batch_bytes_max;
    let mut shutting_down = false;
    loop {
        let (batch, next_ready) = take_batch(peer, k, batch_bytes_max);
        if batch.is_empty() {
            if shutting_down {
                return WriteEnd::Shutdown;
            }
            let sleep = async {
                match next_ready {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = peer.wake.notified() => {}
                _ = sleep => {}
                changed = conn_rx.changed() => {
                    if changed.is_err() { return WriteEnd::Shutdown }
                    return WriteEnd::ConnectionChanged;
                }
                _ = shutdown_rx.changed() => shutting_down = true,
            }
            continue;
        }
        let mut builders: Vec<Option<BatchBuilder>> = (0..k).map(|_| None).collect();
        let mut unwritten = batch.len() as u64;
        for envelope in &batch {
            builders[stream_index(envelope.group, k)].get_or_insert_with(BatchBuilder::new).push(envelope);
        }
        drop(batch);
        for (index, builder) in builders.into_iter().enumerate() {
            let Some(builder) = builder else { continue };
            let envelopes = builder.len() as u64;
            let frame = builder.finish();
            let frame_len = frame.len() as u64;
            if let Err(reason) = write_frame(conn, &mut streams[index], index, frame).await {
                add(&peer.counters.lost_on_disconnect, unwritten);
                return WriteEnd::Failed(reason);
            }
            add(&peer.counters.bytes_sent, frame_len);
            add(&peer.counters.envelopes_sent, envelopes);
            add(&peer.counters.batches_sent, 1);
            unwritten -= envelopes;
        }
    }
}

pub(super) async fn write_frame(
    conn: &Connection,
    stream: &mut Option<SendStream>,
    index: usize,
    frame: Bytes,
) -> Result<(), String> {
    if stream.is_none() {
        let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
        let _ = send.set_priority(RAFT_STREAM_PRIORITY);
        let index = u16::try_from(index).unwrap_or(u16::MAX);
        send.write_chunk(encode_stream_header(&StreamHeader::Raft { index })).await.map_err(|e| e.to_string())?;
        *stream = Some(send);
    }
    match stream {
        Some(send) => send.write_chunk(frame).await.map_err(|e| e.to_string()),
        None => Err("no stream".into()),
    }
}

//! Serving requests where they arrive. A node that registers a [`RequestHandler`]
//! ([`Transport::serve_requests_with`](crate::Transport::serve_requests_with)) has each request
//! served in the task the transport already runs for it (one per request stream, one per
//! pipelined request): no queue to a dispatching task and no second task per request, so a
//! request costs one task and its answer one wake-up less. Without a handler, requests go to
//! [`Incoming::requests`](crate::Incoming::requests).

use crate::stream::IncomingRequest;
use std::future::Future;
use std::pin::Pin;

/// The work of serving one request, owned (it may outlive the call that made it).
pub type Serving = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Serves requests in the transport's tasks.
///
/// The transport answers the requester as soon as the request's [`Responder`](crate::Responder)
/// answers (or is dropped, which answers with an error), or with an error after
/// `request_handler_timeout_ms`. Work that goes on after the answer, or after the timeout, is
/// not cancelled: it runs to its end in a task of its own.
pub trait RequestHandler: Send + Sync + 'static {
    /// The work of serving `request`. It must answer through the request's responder.
    fn serve(&self, request: IncomingRequest) -> Serving;
}

//! Authorization: what a client's role allows. Every client request is checked here by the
//! node that receives it ([`crate::Node::handle`]), before any routing or forwarding; nodes
//! (`PeerIdentity::Node`) are never restricted.
//!
//! The role and key prefix come from the client's certificate ([`crate::transport::cert`]):
//!
//! | request                                   | needs   | admin | readwrite | readonly |
//! |-------------------------------------------|---------|-------|-----------|----------|
//! | `Get`, `Scan`                             | read    | yes   | yes       | yes      |
//! | `Put`, `Delete`, `Cas`                    | write   | yes   | yes       | no       |
//! | `ClusterView`, `MapSince`                 | route   | yes   | yes       | yes      |
//! | every `Admin(..)`, reads such as `Shards` | admin   | yes   | no        | no       |
//!
//! `ClusterView` and `MapSince` are open to every role because a client cannot route without
//! the map; they show shard boundaries (split keys) and node addresses, never values, and to a
//! tenant only the boundaries inside its prefix ([`conceal`]; a tenant is sent its view whole).
//!
//! A prefix-limited client (a tenant) sees the key space as if it held only the keys starting
//! with its prefix: a get, put, delete or compare-and-swap of a key outside it is refused, and
//! a scan is **clamped** to the prefix rather than refused, so that `flotilla kv scan` with no
//! bounds lists the tenant's keys ([`scope_scan`]). A certificate without a role (issued before
//! roles existed) is admin: the compatibility rule of [`crate::transport::cert`].

use crate::placement::{ShardDescriptor, ShardMap};
use crate::transport::{Grant, PeerIdentity, Role};
use crate::wire::{AdminRequest, ClusterView, MapAnswer, Request, Response, ScanEnd};
use std::collections::BTreeMap;

/// The `tracing` target of the audit log: one `info` event per admin request a node receives
/// (refused ones included), with fields `node` (the receiving node), `who`, `operation`,
/// `request` and `outcome`; the event's timestamp says when. Route it apart with a filter such
/// as `--log info,flotilla::audit=info`. Kept stable: operators' log pipelines match on it.
pub const AUDIT_TARGET: &str = "flotilla::audit";

/// Who made a request, for the audit log: `client NAME (role ROLE[, prefix "P"])`, or the node.
pub fn who(from: &PeerIdentity) -> String {
    match from {
        PeerIdentity::Node(id) => format!("node {id}"),
        PeerIdentity::Client(c) => match &c.grant {
            None => format!("client {} (no role: admin by compatibility)", c.name),
            Some(Grant { role, prefix: None }) => format!("client {} (role {role})", c.name),
            Some(Grant { role, prefix: Some(p) }) => {
                format!("client {} (role {role}, prefix \"{}\")", c.name, p.escape_ascii())
            }
        },
    }
}

/// An admin request's outcome for the audit log: `ok`, or why not.
pub fn audit_outcome(resp: &Response) -> String {
    match resp {
        Response::Admin(_) => "ok".into(),
        Response::Denied(e) => format!("denied: {e}"),
        Response::Invalid(e) => format!("invalid: {e}"),
        Response::Unavailable(e) => format!("unavailable: {e}"),
        Response::Unknown(e) => format!("unknown: {e}"),
        other => format!("unexpected answer: {other:?}"),
    }
}

/// What a request needs of the role.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading keys.
    Read,
    /// Changing keys.
    Write,
    /// Reading the shard map and node addresses, which every client needs to route.
    Route,
    /// Administering the cluster, reads of its state included.
    Admin,
}

/// What `req` needs.
pub fn access(req: &Request) -> Access {
    match req {
        Request::Get { .. } | Request::Scan { .. } => Access::Read,
        Request::Put { .. }
        | Request::Delete { .. }
        | Request::Cas { .. }
        | Request::Update { .. }
        | Request::InsertAll { .. } => Access::Write,
        Request::ClusterView { .. } | Request::MapSince { .. } => Access::Route,
        Request::Admin(_) => Access::Admin,
    }
}

/// Whether `role` may make requests needing `access`.
pub fn allows(role: Role, access: Access) -> bool {
    match role {
        Role::Admin => true,
        Role::ReadWrite => access != Access::Admin,
        Role::ReadOnly => matches!(access, Access::Read | Access::Route),
    }
}

/// The operation's name in a refusal, as the CLI spells it.
pub fn operation(req: &Request) -> &'static str {
    match req {
        Request::Get { .. } => "get",
        Request::Put { .. } => "put",
        Request::Delete { .. } => "delete",
        Request::Cas { .. } => "cas",
        Request::Update { .. } => "update",
        Request::InsertAll { .. } => "insert",
        Request::Scan { .. } => "scan",
        Request::ClusterView { .. } | Request::MapSince { .. } => "read the cluster view",
        Request::Admin(a) => match a {
            AdminRequest::Nodes => "admin nodes",
            AdminRequest::Shards | AdminRequest::ShardsPage { .. } => "admin shards",
            AdminRequest::Split { .. } => "split",
            AdminRequest::Move { .. } => "move",
            AdminRequest::TransferLeader { .. } => "transfer-leader",
            AdminRequest::Rebalance => "rebalance",
            AdminRequest::Merge { .. } => "merge",
            AdminRequest::Drain { .. } => "drain",
            AdminRequest::Status => "admin status",
            AdminRequest::AddNode { .. } => "add-node",
            AdminRequest::BackupStart { .. } | AdminRequest::BackupRead { .. } | AdminRequest::BackupEnd { .. } => {
                "backup"
            }
            AdminRequest::ReplicaStates { .. }
            | AdminRequest::ForceAlone { .. }
            | AdminRequest::DropReplica { .. }
            | AdminRequest::RemoveDeadNodes { .. } => "unsafe-recover",
        },
    }
}

/// The limits on `from`; `None` for unrestricted peers: nodes, and clients whose certificate
/// carries no role (the compatibility rule).
pub fn grant_of(from: &PeerIdentity) -> Option<&Grant> {
    match from {
        PeerIdentity::Node(_) => None,
        PeerIdentity::Client(c) => c.grant.as_ref(),
    }
}

/// The keys a request names (a scan's range is not a key).
fn keys_of(req: &Request) -> Vec<&[u8]> {
    match req {
        Request::Get { key, .. }
        | Request::Put { key, .. }
        | Request::Delete { key, .. }
        | Request::Cas { key, .. }
        | Request::Update { key, .. } => vec![key],
        Request::InsertAll { pairs, .. } => pairs.iter().map(|(k, _)| k.as_slice()).collect(),
        Request::Scan { .. } | Request::ClusterView { .. } | Request::MapSince { .. } | Request::Admin(_) => Vec::new(),
    }
}

/// Checks `req` from `from`; the error says who may not do what (the node answers it as
/// [`crate::wire::Response::Denied`]). A scan's range is not checked here: [`scope_scan`]
/// clamps it.
pub fn check(from: &PeerIdentity, req: &Request) -> Result<(), String> {
    let Some(grant) = grant_of(from) else { return Ok(()) };
    if !allows(grant.role, access(req)) {
        return Err(format!("role {} may not {}", grant.role, operation(req)));
    }
    if let Some(prefix) = &grant.prefix {
        if let Some(key) = keys_of(req).into_iter().find(|key| !key_allowed(grant, key)) {
            return Err(format!(
                "role {} limited to keys starting with \"{}\" may not {} key \"{}\"",
                grant.role,
                prefix.escape_ascii(),
                operation(req),
                key.escape_ascii()
            ));
        }
    }
    Ok(())
}

/// Whether `grant`'s prefix, if it has one, lets its holder name `key` (the Redis front door
/// applies the same rule to every key of a command).
pub fn key_allowed(grant: &Grant, key: &[u8]) -> bool {
    grant.prefix.as_deref().is_none_or(|prefix| key.starts_with(prefix))
}

/// The first key after every key starting with `prefix`; `None` when no key is (a prefix of
/// only `0xff` bytes, or empty).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A scan's range as a prefix-limited client may see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanScope {
    /// No key the client may see lies in the range: answer an empty page covering this far.
    Nothing(ScanEnd),
    /// Scan `[start, end)`, the request's range cut to the prefix.
    Range {
        /// At or after the prefix.
        start: Vec<u8>,
        /// At or before the prefix's end.
        end: Option<Vec<u8>>,
        /// When the end was cut: `(the prefix's end, the request's end)`. A page covering up
        /// to the prefix's end covers, for this client, up to the request's end: saying so
        /// moves the client's scan past the prefix instead of into keys it would be refused.
        cut_end: Option<(Vec<u8>, Option<Vec<u8>>)>,
    },
}

/// Clamps a scan of `[start, end)` to the keys starting with `prefix`. Keys outside the prefix
/// are invisible to the client rather than refused, so each answer says how far the client
/// has seen everything it may see, and a scan over the whole key space moves straight to the
/// prefix and stops after it.
pub fn scope_scan(prefix: &[u8], start: Vec<u8>, end: Option<Vec<u8>>) -> ScanScope {
    let after = prefix_end(prefix);
    if end.as_deref().is_some_and(|e| e <= prefix) {
        // Wholly before the prefix: nothing visible up to the prefix itself.
        return ScanScope::Nothing(ScanEnd::Covered(Some(prefix.to_vec())));
    }
    if after.as_deref().is_some_and(|a| start.as_slice() >= a) {
        // Wholly after the prefix: nothing visible to the end of the key space.
        return ScanScope::Nothing(ScanEnd::Covered(None));
    }
    let start = if start.as_slice() < prefix { prefix.to_vec() } else { start };
    match after {
        Some(a) if end.as_ref().is_none_or(|e| *e > a) => {
            ScanScope::Range { start, end: Some(a.clone()), cut_end: Some((a, end)) }
        }
        _ => ScanScope::Range { start, end, cut_end: None },
    }
}

/// The page end a client is told once its scan was clamped by [`scope_scan`].
pub fn widen_page_end(page_end: ScanEnd, cut_end: Option<(Vec<u8>, Option<Vec<u8>>)>) -> ScanEnd {
    match (page_end, cut_end) {
        (ScanEnd::Covered(Some(e)), Some((cut, requested))) if e == cut => ScanEnd::Covered(requested),
        (page_end, _) => page_end,
    }
}

/// What a prefix-limited client (a tenant) is told of shard boundaries: only those inside its
/// prefix, which are its own keys. Split keys elsewhere may be other tenants' key names, so
/// the shards that do not overlap the prefix are left out of its cluster view, and the first
/// and last shards it sees are shown reaching to the ends of the key space. Its map still
/// covers the key space (the client's routing needs that); keys outside the prefix route to
/// those end shards and are refused by [`check`] before any routing. The same view of a
/// descriptor goes with redirects (a stale epoch, a key in another shard), so the client's
/// map stays consistent. Everyone else's answers pass unchanged.
pub fn conceal(from: &PeerIdentity, resp: Response) -> Response {
    let Some(prefix) = grant_of(from).and_then(|g| g.prefix.as_deref()) else { return resp };
    let end = prefix_end(prefix);
    match resp {
        Response::View(view) => Response::View(conceal_view(prefix, end.as_deref(), view)),
        // A tenant is sent the whole map in one page (`Node::map_since`), concealed as a view
        // is: pages and changes would name other tenants' split keys in their bounds.
        Response::Map(MapAnswer::Page { revision, shards, next: None, nodes })
            if shards.first().is_some_and(|d| d.start.is_empty()) =>
        {
            let mut map = ShardMap::default();
            shards.into_iter().for_each(|d| map.put_unchecked(d));
            let view = conceal_view(prefix, end.as_deref(), ClusterView { map, nodes });
            let shards = view.map.shards().cloned().collect();
            Response::Map(MapAnswer::Page { revision, shards, next: None, nodes: view.nodes })
        }
        Response::Map(_) => Response::Unavailable("a prefix-limited client is sent the map whole".into()),
        Response::StaleEpoch { descriptor } => {
            Response::StaleEpoch { descriptor: conceal_descriptor(prefix, end.as_deref(), descriptor) }
        }
        Response::WrongShard { owner } => {
            Response::WrongShard { owner: conceal_descriptor(prefix, end.as_deref(), owner) }
        }
        other => other,
    }
}

/// What a prefix-limited client (a tenant) is shown of `map` (with the nodes' addresses
/// `nodes`): the shards overlapping its prefix, as [`conceal`] shows a view, found from the
/// prefix alone (not by a walk of the whole map). `None` for everyone else.
pub fn tenant_view(
    from: &PeerIdentity,
    map: &ShardMap,
    nodes: &BTreeMap<crate::placement::NodeId, String>,
) -> Option<ClusterView> {
    let prefix = grant_of(from).and_then(|g| g.prefix.as_deref())?;
    Some(concealed(prefix, prefix_end(prefix).as_deref(), map, nodes))
}

/// `d` with a start before `prefix` shown as the empty key and an end at or past `end` (the
/// prefix's end) shown as unbounded.
fn conceal_descriptor(prefix: &[u8], end: Option<&[u8]>, mut d: ShardDescriptor) -> ShardDescriptor {
    if d.start.as_slice() < prefix {
        d.start = Vec::new();
    }
    if d.end.as_deref().is_some_and(|e| end.is_none_or(|end| e >= end)) {
        d.end = None;
    }
    d
}

/// The shards of `view` that overlap the keys starting with `prefix`, each as
/// [`conceal_descriptor`] shows it, and the addresses of the nodes holding them.
fn conceal_view(prefix: &[u8], end: Option<&[u8]>, view: ClusterView) -> ClusterView {
    concealed(prefix, end, &view.map, &view.nodes)
}

/// The shards of `map` overlapping `[prefix, end)`, each as [`conceal_descriptor`] shows it,
/// and the addresses (of `nodes`) of the nodes holding them.
fn concealed(
    prefix: &[u8],
    end: Option<&[u8]>,
    map: &ShardMap,
    nodes: &BTreeMap<crate::placement::NodeId, String>,
) -> ClusterView {
    let mut shown = ShardMap::default();
    let mut addrs = BTreeMap::new();
    for d in map.lookup_range(prefix, end) {
        for r in &d.replicas {
            if let Some(addr) = nodes.get(&r.node) {
                addrs.insert(r.node, addr.clone());
            }
        }
        shown.put_unchecked(conceal_descriptor(prefix, end, d.clone()));
    }
    ClusterView { map: shown, nodes: addrs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{Epoch, NodeId, ShardId};
    use crate::transport::ClientIdentity;
    use crate::wire::ReadConsistency;

    fn every_request(key: &[u8]) -> Vec<Request> {
        let (shard, epoch, key) = (ShardId(1), Epoch { conf_version: 1, version: 1 }, key.to_vec());
        let consistency = ReadConsistency::Linearizable;
        let mut all = vec![
            Request::Get { shard, epoch, key: key.clone(), consistency },
            Request::Put { shard, epoch, key: key.clone(), value: b"v".to_vec() },
            Request::Delete { shard, epoch, key: key.clone() },
            Request::Cas { shard, epoch, key: key.clone(), expected: None, new: Some(b"v".to_vec()) },
            Request::Update { shard, epoch, key: key.clone(), op: crate::wire::UpdateOp::AddInt(1) },
            Request::InsertAll { shard, epoch, pairs: vec![(key.clone(), b"v".to_vec())] },
            Request::Scan { shard, epoch, start: key.clone(), end: None, limit: 10, consistency },
            Request::ClusterView { fresh: false },
            Request::ClusterView { fresh: true },
            Request::MapSince { since: 0, from: None, limit: 10, progress: 0, fresh: false },
        ];
        all.extend(
            [
                AdminRequest::Nodes,
                AdminRequest::Shards,
                AdminRequest::Split { key: key.clone() },
                AdminRequest::Move { shard, from: NodeId(1), to: NodeId(2) },
                AdminRequest::TransferLeader { shard, node: NodeId(2) },
                AdminRequest::Rebalance,
                AdminRequest::Merge { shard },
                AdminRequest::Drain { node: NodeId(1), draining: true },
                AdminRequest::Status,
                AdminRequest::AddNode { node: NodeId(4), addr: "127.0.0.1:1".into() },
            ]
            .map(Request::Admin),
        );
        all
    }

    fn client(grant: Option<Grant>) -> PeerIdentity {
        PeerIdentity::Client(ClientIdentity { name: "c".into(), grant })
    }

    /// What the table in the module's documentation says, written out per operation.
    fn expected(role: Role, op: &str) -> bool {
        let data_read = ["get", "scan", "read the cluster view"].contains(&op);
        let data_write = ["put", "delete", "cas", "update", "insert"].contains(&op);
        match role {
            Role::Admin => true,
            Role::ReadWrite => data_read || data_write,
            Role::ReadOnly => data_read,
        }
    }

    #[test]
    fn every_request_against_every_role() {
        let requests = every_request(b"k");
        // Guards against a new request or admin operation added without a row here.
        assert_eq!(requests.len(), 20);
        for req in &requests {
            let op = operation(req);
            for role in Role::ALL {
                let got = check(&client(Some(Grant::new(role))), req);
                assert_eq!(got.is_ok(), expected(role, op), "{role} {op}: {got:?}");
                if let Err(e) = got {
                    assert_eq!(e, format!("role {role} may not {op}"));
                }
            }
            // Nodes and certificates without a role (the compatibility rule) may do anything.
            assert_eq!(check(&PeerIdentity::Node(NodeId(2)), req), Ok(()));
            assert_eq!(check(&client(None), req), Ok(()));
        }
    }

    #[test]
    fn the_refusal_names_the_role_and_the_operation() {
        let put = &every_request(b"k")[1];
        let err = check(&client(Some(Grant::new(Role::ReadOnly))), put).unwrap_err();
        assert_eq!(err, "role readonly may not put");
        let split = Request::Admin(AdminRequest::Split { key: b"k".to_vec() });
        assert_eq!(
            check(&client(Some(Grant::new(Role::ReadWrite))), &split).unwrap_err(),
            "role readwrite may not split"
        );
    }

    #[test]
    fn single_key_requests_stay_inside_the_prefix() {
        for role in [Role::ReadWrite, Role::ReadOnly] {
            let who = client(Some(Grant::with_prefix(role, b"t/".to_vec())));
            // Inside: the prefix itself and longer keys. Outside: just before, just after,
            // the prefix's first byte alone, and a key the prefix merely contains.
            for (key, inside) in [
                (&b"t/"[..], true),
                (b"t/a", true),
                (b"t/\xff\xff", true),
                (b"t.", false),
                (b"t0", false),
                (b"t", false),
                (b"u/", false),
                (b"at/", false),
            ] {
                for req in every_request(key) {
                    if !matches!(
                        req,
                        Request::Get { .. } | Request::Put { .. } | Request::Delete { .. } | Request::Cas { .. }
                    ) {
                        continue;
                    }
                    let allowed = expected(role, operation(&req)) && inside;
                    let got = check(&who, &req);
                    assert_eq!(got.is_ok(), allowed, "{role} {} {:?}: {got:?}", operation(&req), key.escape_ascii());
                    if !inside && expected(role, operation(&req)) {
                        assert!(got.unwrap_err().contains("limited to keys starting with \"t/\""));
                    }
                }
            }
            // A scan's role is checked; its range is clamped, not refused.
            let scan = Request::Scan {
                shard: ShardId(1),
                epoch: Epoch { conf_version: 1, version: 1 },
                start: b"a".to_vec(),
                end: None,
                limit: 1,
                consistency: ReadConsistency::Stale,
            };
            assert_eq!(check(&who, &scan), Ok(()));
        }
    }

    #[test]
    fn audit_names_who_and_the_outcome() {
        assert_eq!(who(&PeerIdentity::Node(NodeId(3))), "node 3");
        assert_eq!(who(&client(None)), "client c (no role: admin by compatibility)");
        assert_eq!(who(&client(Some(Grant::new(Role::ReadOnly)))), "client c (role readonly)");
        assert_eq!(
            who(&client(Some(Grant::with_prefix(Role::ReadWrite, b"t/\xff".to_vec())))),
            "client c (role readwrite, prefix \"t/\\xff\")"
        );
        assert_eq!(
            audit_outcome(&Response::Denied("role readonly may not split".into())),
            "denied: role readonly may not split"
        );
        assert_eq!(audit_outcome(&Response::Admin(crate::wire::AdminResponse::Done("x".into()))), "ok");
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"t/"), Some(b"t0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    fn range(start: &[u8], end: Option<&[u8]>, cut: Option<(&[u8], Option<&[u8]>)>) -> ScanScope {
        ScanScope::Range {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            cut_end: cut.map(|(a, b)| (a.to_vec(), b.map(<[u8]>::to_vec))),
        }
    }

    #[test]
    fn scans_are_clamped_to_the_prefix() {
        let s = |start: &[u8], end: Option<&[u8]>| scope_scan(b"t/", start.to_vec(), end.map(<[u8]>::to_vec));
        // The whole key space: the prefix's range, its end widened back to the request's.
        assert_eq!(s(b"\x01", None), range(b"t/", Some(b"t0"), Some((b"t0", None))));
        // Inside the prefix: unchanged.
        assert_eq!(s(b"t/a", Some(b"t/b")), range(b"t/a", Some(b"t/b"), None));
        // Ending exactly at the prefix's end: unchanged (nothing to widen).
        assert_eq!(s(b"t/", Some(b"t0")), range(b"t/", Some(b"t0"), None));
        // Starting just before the prefix, ending just past its end.
        assert_eq!(s(b"t.", Some(b"t1")), range(b"t/", Some(b"t0"), Some((b"t0", Some(b"t1")))));
        // Ending just inside the prefix.
        assert_eq!(s(b"a", Some(b"t/\x00")), range(b"t/", Some(b"t/\x00"), None));
        // Wholly before: nothing up to the prefix (also when the end is the prefix itself).
        assert_eq!(s(b"a", Some(b"t/")), ScanScope::Nothing(ScanEnd::Covered(Some(b"t/".to_vec()))));
        assert_eq!(s(b"a", Some(b"t.")), ScanScope::Nothing(ScanEnd::Covered(Some(b"t/".to_vec()))));
        // Wholly after: nothing to the end of the key space.
        assert_eq!(s(b"t0", None), ScanScope::Nothing(ScanEnd::Covered(None)));
        assert_eq!(s(b"u", Some(b"z")), ScanScope::Nothing(ScanEnd::Covered(None)));
        // A prefix of 0xff bytes has no end: only the start is clamped.
        assert_eq!(scope_scan(b"\xff", b"a".to_vec(), None), range(b"\xff", None, None));
    }

    #[test]
    fn a_page_reaching_the_cut_end_covers_the_requested_end() {
        let cut = Some((b"t0".to_vec(), Some(b"x".to_vec())));
        assert_eq!(
            widen_page_end(ScanEnd::Covered(Some(b"t0".to_vec())), cut.clone()),
            ScanEnd::Covered(Some(b"x".to_vec()))
        );
        assert_eq!(
            widen_page_end(ScanEnd::Covered(Some(b"t/m".to_vec())), cut.clone()),
            ScanEnd::Covered(Some(b"t/m".to_vec()))
        );
        assert_eq!(widen_page_end(ScanEnd::More, cut), ScanEnd::More);
        assert_eq!(
            widen_page_end(ScanEnd::Covered(Some(b"t0".to_vec())), None),
            ScanEnd::Covered(Some(b"t0".to_vec()))
        );
        assert_eq!(
            widen_page_end(ScanEnd::Covered(Some(b"t0".to_vec())), Some((b"t0".to_vec(), None))),
            ScanEnd::Covered(None)
        );
    }

    /// Four shards split at "a", "t/m" and "u": a tenant of "t/" sees the two overlapping its
    /// prefix, reaching to the key space's ends, and the nodes holding them; no split key but
    /// its own ("t/m"), in the view or in a redirect.
    #[test]
    fn a_tenant_sees_only_the_shard_boundaries_inside_its_prefix() {
        use crate::placement::{Replica, ReplicaRole};
        let epoch = Epoch { conf_version: 1, version: 2 };
        let shard = |id: u64, start: &str, end: Option<&str>, node: u64| ShardDescriptor {
            id: ShardId(id),
            start: start.as_bytes().to_vec(),
            end: end.map(|e| e.as_bytes().to_vec()),
            epoch,
            replicas: vec![Replica { node: NodeId(node), role: ReplicaRole::Voter }],
        };
        let mut map = ShardMap::default();
        for d in [
            shard(1, "", Some("a"), 1),
            shard(2, "a", Some("t/m"), 2),
            shard(3, "t/m", Some("u"), 3),
            shard(4, "u", None, 4),
        ] {
            map.put_unchecked(d);
        }
        map.validate().expect("a whole map");
        let nodes: BTreeMap<NodeId, String> = (1..=4).map(|n| (NodeId(n), format!("10.0.0.{n}:7000"))).collect();
        let view = ClusterView { map, nodes };
        let tenant = client(Some(Grant { role: Role::ReadWrite, prefix: Some(b"t/".to_vec()) }));
        let Response::View(seen) = conceal(&tenant, Response::View(view.clone())) else { panic!("a view") };
        seen.map.validate().expect("the tenant's map still covers the key space");
        let shown: Vec<String> = seen.map.shards().map(|d| format!("{} {:?}..{:?}", d.id.0, d.start, d.end)).collect();
        assert_eq!(shown, ["2 []..Some([116, 47, 109])", "3 [116, 47, 109]..None"]);
        assert_eq!(seen.nodes.keys().copied().collect::<Vec<_>>(), vec![NodeId(2), NodeId(3)]);
        let Response::StaleEpoch { descriptor } =
            conceal(&tenant, Response::StaleEpoch { descriptor: shard(2, "a", Some("t/m"), 2) })
        else {
            panic!("a redirect")
        };
        assert_eq!((descriptor.start.as_slice(), descriptor.end.as_deref()), (&b""[..], Some(&b"t/m"[..])));
        let Response::WrongShard { owner } =
            conceal(&tenant, Response::WrongShard { owner: shard(3, "t/m", Some("u"), 3) })
        else {
            panic!("a redirect")
        };
        assert_eq!(owner.end, None);
        // The map whole in one page, as a tenant is sent it: the same shards as the view.
        let whole = |view: &ClusterView| MapAnswer::Page {
            revision: 9,
            shards: view.map.shards().cloned().collect(),
            next: None,
            nodes: view.nodes.clone(),
        };
        assert_eq!(conceal(&tenant, Response::Map(whole(&view))), Response::Map(whole(&seen)));
        // Anything else of the map (a page, changes) would show other bounds: refused.
        let part = MapAnswer::Page {
            revision: 9,
            shards: vec![shard(2, "a", Some("t/m"), 2)],
            next: None,
            nodes: BTreeMap::new(),
        };
        let changes = MapAnswer::Changes {
            base: 1,
            revision: 9,
            changed: vec![],
            removed: vec![],
            nodes: BTreeMap::new(),
            progress: 0,
        };
        for answer in [part, changes] {
            assert!(matches!(conceal(&tenant, Response::Map(answer)), Response::Unavailable(_)));
        }
        // Unrestricted clients and nodes see everything.
        let admin = client(Some(Grant { role: Role::Admin, prefix: None }));
        assert_eq!(conceal(&admin, Response::Map(whole(&view))), Response::Map(whole(&view)));
        assert_eq!(conceal(&admin, Response::View(view.clone())), Response::View(view.clone()));
        assert_eq!(conceal(&PeerIdentity::Node(NodeId(2)), Response::View(view.clone())), Response::View(view));
    }
}

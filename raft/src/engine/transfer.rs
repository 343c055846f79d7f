//! Leadership transfer: the leader brings the target up to date, then tells it to campaign
//! at once (`TimeoutNow`). Raft thesis §3.10.

use super::*;
use replication::Replicator;

#[derive(Debug)]
pub(super) struct Transfer {
    pub(super) target: NodeId,
    pub(super) deadline: Millis,
    pub(super) timeout_now_sent: bool,
}

impl Engine {
    /// The work of [`Engine::transfer_leader`].
    pub(super) fn start_transfer(&mut self, now: Millis, target: NodeId) -> Result<(), RaftError> {
        let Some(l) = self.role.leader_mut() else {
            return Err(RaftError::NotLeader { leader: self.leader });
        };
        if target == self.id {
            return Ok(());
        }
        if !self.memberships.effective().membership.is_voter(target) {
            return Err(RaftError::InvalidTarget(target, "not a voter"));
        }
        if l.transfer.is_some() {
            return Err(RaftError::TransferInProgress);
        }
        info!(node = %self.id, term = %self.vote.term, %target, "transferring leadership");
        l.transfer =
            Some(Transfer { target, deadline: now.add_ms(self.config.transfer_timeout_ms), timeout_now_sent: false });
        self.maybe_send_timeout_now();
        self.send_append(now, target);
        Ok(())
    }

    /// Tells the transfer's target to campaign once it has the whole log.
    pub(super) fn maybe_send_timeout_now(&mut self) {
        if let Some(mut r) = self.replicator() {
            r.maybe_send_timeout_now();
        }
    }

    /// The leader hands leadership over: campaign at once, in an election that followers'
    /// leases do not block.
    pub(super) fn on_timeout_now(&mut self, now: Millis, from: NodeId) {
        if self.leader == Some(from) && self.can_campaign() {
            info!(node = %self.id, term = %self.vote.term, %from, "leadership handed over: campaigning");
            self.campaign(now, true);
        }
    }
}

impl Replicator<'_> {
    /// Sends `TimeoutNow` to the transfer's target once it matched the whole log (once).
    fn maybe_send_timeout_now(&mut self) {
        let last = self.log.last_index();
        let l = &mut *self.leader;
        let Some(t) = &mut l.transfer else { return };
        if t.timeout_now_sent || l.progress.get(&t.target).is_none_or(|p| p.matched < last) {
            return;
        }
        t.timeout_now_sent = true;
        let target = t.target;
        l.reads.void_lease();
        self.send(target, MessageBody::TimeoutNow);
    }
}

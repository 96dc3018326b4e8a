//! Lease tickets: the coordinator's proof that a lease (unit, learner epoch, step incarnation)
//! went to one actor. `LeaseWork` hands the ticket out with the unit; `CompleteWork` and the
//! rollout group carry it back, and the coordinator and the learner take a report or a group
//! only with a ticket for that unit and that actor. An actor thus cannot complete, hand back
//! or submit a unit leased to another, even with a valid actor credential.
//!
//! A ticket is `<incarnation>.<hex HMAC-SHA256>` over the lease's fields, keyed with the
//! learner credential, which the coordinator (to verify the learner) and the learner (to call
//! the coordinator) both hold already. The coordinator signs with the credential's first
//! token; both accept a ticket signed with any of its tokens, so a rotation keeps every lease
//! valid while the old token is still listed.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::{BearerToken, Credential};

/// The longest ticket a server looks at: `u32` digits, a dot and 64 hex digits.
pub const MAX_TICKET_BYTES: usize = 10 + 1 + 64;

/// The fields a ticket vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease<'a> {
    pub unit_id: &'a str,
    pub epoch: u64,
    pub incarnation: u32,
    pub actor_id: &'a str,
}

/// Signs and checks lease tickets.
#[derive(Debug, Clone)]
pub struct LeaseTickets {
    key: Credential,
}

fn mac(key: &BearerToken, lease: &Lease<'_>) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.secret().as_bytes()).expect("HMAC takes any key length");
    m.update(b"selfplay lease ticket v1\0");
    // Length-prefixed, so no two leases give the same message.
    for field in [lease.unit_id.as_bytes(), lease.actor_id.as_bytes()] {
        m.update(&(field.len() as u64).to_le_bytes());
        m.update(field);
    }
    m.update(&lease.epoch.to_le_bytes());
    m.update(&lease.incarnation.to_le_bytes());
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

impl LeaseTickets {
    /// Tickets keyed with the learner credential.
    pub fn new(learner: Credential) -> Self {
        Self { key: learner }
    }

    /// The ticket of `lease`.
    pub fn sign(&self, lease: &Lease<'_>) -> String {
        let tag = mac(&self.key.current(), lease).finalize().into_bytes();
        format!("{}.{}", lease.incarnation, hex(&tag))
    }

    /// The incarnation a ticket names, `None` when it is not a ticket.
    pub fn incarnation(ticket: &str) -> Option<u32> {
        if ticket.len() > MAX_TICKET_BYTES {
            return None;
        }
        let (inc, _) = ticket.split_once('.')?;
        inc.parse().ok()
    }

    /// Whether `ticket` is a ticket of `lease` under any of the credential's tokens (compared
    /// in constant time).
    pub fn verify(&self, lease: &Lease<'_>, ticket: &str) -> bool {
        if ticket.len() > MAX_TICKET_BYTES {
            return false;
        }
        let Some((inc, tag)) = ticket.split_once('.') else {
            return false;
        };
        if inc.parse::<u32>().ok() != Some(lease.incarnation) {
            return false;
        }
        let Some(tag) = unhex(tag) else {
            return false;
        };
        self.key.tokens().iter().any(|k| mac(k, lease).verify_slice(&tag).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease<'a>(unit: &'a str, actor: &'a str) -> Lease<'a> {
        Lease { unit_id: unit, epoch: 3, incarnation: 1, actor_id: actor }
    }

    #[test]
    fn a_ticket_fits_one_lease_only() {
        let t = LeaseTickets::new(Credential::generate());
        let l = lease("s4-u2", "actor-a");
        let ticket = t.sign(&l);
        assert!(ticket.len() <= MAX_TICKET_BYTES);
        assert_eq!(LeaseTickets::incarnation(&ticket), Some(1));
        assert!(t.verify(&l, &ticket));
        for other in [
            lease("s4-u3", "actor-a"),
            lease("s4-u2", "actor-b"),
            Lease { epoch: 4, ..l },
            Lease { incarnation: 2, ..l },
            // Fields do not run into each other.
            lease("s4-u2a", "ctor-a"),
        ] {
            assert!(!t.verify(&other, &ticket), "{other:?}");
        }
        for bad in ["", "1.", "1.zz", "x.00", &ticket[..ticket.len() - 1], &format!("{ticket}0")] {
            assert!(!t.verify(&l, bad), "{bad:?}");
        }
        // Another key: refused.
        assert!(!LeaseTickets::new(Credential::generate()).verify(&l, &ticket));
    }

    #[test]
    fn tickets_survive_a_rotation_while_the_old_token_is_listed() {
        let (old, new) = (BearerToken::generate(), BearerToken::generate());
        let before = LeaseTickets::new(old.clone().into());
        let during = LeaseTickets::new(Credential::fixed(vec![new.clone(), old]).unwrap());
        let after = LeaseTickets::new(new.into());
        let l = lease("s1-u0", "a");
        let early = before.sign(&l);
        assert!(during.verify(&l, &early));
        assert!(!after.verify(&l, &early), "once the old token is gone, its tickets are too");
        assert!(after.verify(&l, &during.sign(&l)), "during the rollover the new token signs");
    }
}

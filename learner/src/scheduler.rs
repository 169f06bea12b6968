//! The learner's prompt scheduler (spec §1 step 1, §5): which prompts the actors roll out next,
//! which returned groups train, and when a batch is complete. Plain bookkeeping without tensors
//! or I/O; the Learner service holds it behind a mutex and passes the current time in.
//!
//! One iteration of the synchronous default (`max_staleness = 0`):
//!
//! 1. *Collecting*: [`Scheduler::pull`] hands out work items (one prompt, K samples) for the
//!    current policy version; [`Scheduler::submit`] takes back whole graded groups and keeps
//!    those the filter passes ([`crate::algo::filter::verdict`], spec §5.1).
//! 2. Once B groups are kept, [`Scheduler::take_batch`] returns the first B in arrival order,
//!    queues the prompts of the surplus ones (their responses are discarded, spec §5.2),
//!    cancels the work still out and switches to *Training*: no work is handed out
//!    (backpressure), and groups of cancelled work are `Stale` when they arrive.
//! 3. [`Scheduler::publish`] records the new policy version and goes back to collecting.
//!
//! Prompt order: a seeded permutation per pass over the data (`ChaCha8Rng` seeded with
//! `seed + epoch`), so `(data_epoch, data_cursor)` fixes the rest of the pass. Prompts that come
//! back (surplus groups, expired leases, cancelled work) wait in one FIFO queue that is served
//! before new prompts. [`Scheduler::state`] lists every prompt that was drawn but not consumed
//! (queued, out, or kept and not trained on yet), so a run resumed from it loses none; taken
//! right after a batch, as the trainer checkpoints, it reproduces the order exactly.
//!
//! Idempotency: `work_id`s are unique per hand-out and a group names one as its `group_id`. A
//! second group for the same hand-out is a `Duplicate` and changes nothing. Hand-outs are
//! remembered for one version beyond the staleness bound; a group naming an older one is
//! `Stale`, an id never handed out is `Rejected`.
//!
//! Leases: work not returned within `lease` of its hand-out is queued again (`reissued`); an
//! accepted group from an actor renews the leases of that actor's other work, so a large work
//! batch streamed group by group does not expire half-way. A late group of expired work still
//! counts if no group for that prompt hand-out arrived first: first one wins, the other is a
//! `Duplicate`, and a queued copy that nobody took yet is withdrawn.
//!
//! Bounded staleness (`max_staleness = N > 0`): groups sampled up to N versions before the
//! current one are accepted, work is handed out during training too (actors run ahead), and only
//! work and kept groups that would be too old after the next version are cancelled or queued
//! again. Every group carries the one version it was sampled with.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prime_proto::v1 as pb;
use prime_verifier::Ability;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use prime_algo::filter::{verdict, Verdict};
use prime_algo::FilterConfig;

use crate::batch::ScoredGroup;
use crate::checkpoint::TrainerState;
use crate::error::{LearnerError, Result};

/// How long a refused actor waits before asking again (capped by half a lease).
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// Actors silent for this many leases are forgotten.
const ACTOR_TIMEOUT_LEASES: u32 = 3;
/// Number of most recent groups behind [`SchedulerStatus::filter_pass_rate`].
const RECENT_GROUPS: usize = 256;

/// One training prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Token ids, chat template applied.
    pub prompt_ids: Vec<i64>,
    /// Reference answer (math) or JSON test spec (code), for the verifier.
    pub ground_truth: String,
    /// Which grader applies.
    pub ability: Ability,
    /// The row's `data_source` (actors route grading by it).
    pub data_source: String,
    /// The row's `extra_info` as a JSON object, empty when it has none (for the verifier).
    pub extra_info: String,
}

/// The scheduler's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// B: kept groups per training batch.
    pub batch_groups: usize,
    /// K: responses sampled per prompt (at least 2, for the leave-one-out baselines).
    pub k: u32,
    /// Most policy versions a group may lag behind the current one; 0 is on-policy.
    pub max_staleness: u64,
    /// Work not returned this long after its hand-out is handed out again.
    pub lease: Duration,
    /// The online filter (spec §5.1).
    pub filter: FilterConfig,
    /// Seed of the per-epoch prompt shuffles.
    pub seed: u64,
    /// Prompts sampled per round as a multiple of B (`learner.rollout.oversample`): with 0 for
    /// `max_outstanding_prompts`, prompts out plus kept groups waiting stay under
    /// `ceil(B · oversample)` per version the actors may sample for (1 on-policy,
    /// `1 + max_staleness` otherwise), so an on-policy step hands out what it needs and a
    /// filtered group's prompt is replaced as soon as it comes back.
    pub oversample: f64,
    /// Most prompts out at once (kept groups not counted); 0 means the bound above.
    pub max_outstanding_prompts: usize,
    /// Size of the models' vocabulary: a submitted token id must lie in `0..vocab_size`, so a
    /// bad actor's group is refused at the door instead of failing the step.
    pub vocab_size: i64,
    /// Most tokens a submitted response may have (the sampling limit the actors are given).
    pub max_response_tokens: usize,
}

impl SchedulerConfig {
    /// Prompts of one round: `ceil(B · oversample)`.
    fn round(&self) -> usize {
        ((self.batch_groups as f64 * self.oversample).ceil() as usize).max(self.batch_groups)
    }

    /// Most prompts out (and, by default, kept groups waiting) at once.
    fn allowance(&self) -> usize {
        match self.max_outstanding_prompts {
            0 => self.round() * (1 + self.max_staleness.min(64) as usize),
            cap => cap,
        }
    }

    /// How many more prompts may be handed out with `outstanding` out and `buffered` kept
    /// groups waiting for a batch.
    fn room(&self, outstanding: usize, buffered: usize) -> usize {
        let taken = match self.max_outstanding_prompts {
            0 => outstanding + buffered,
            _ => outstanding,
        };
        self.allowance().saturating_sub(taken)
    }

    fn validate(&self) -> Result<()> {
        let problem = if self.batch_groups == 0 {
            Some("batch_groups must be at least 1".to_string())
        } else if self.k < 2 {
            Some(format!(
                "k = {} but the leave-one-out baselines need at least 2 responses per prompt",
                self.k
            ))
        } else if self.lease.is_zero() {
            Some("the lease must be longer than zero".to_string())
        } else if self.vocab_size <= 0 || self.max_response_tokens == 0 {
            Some(format!(
                "vocab_size ({}) and max_response_tokens ({}) must be positive",
                self.vocab_size, self.max_response_tokens
            ))
        } else if self.filter.enabled
            && !(self.filter.lower.is_finite()
                && self.filter.upper.is_finite()
                && self.filter.lower <= self.filter.upper)
        {
            Some(format!(
                "filter bounds [{}, {}] are not an interval",
                self.filter.lower, self.filter.upper
            ))
        } else {
            None
        };
        match problem {
            Some(message) => Err(LearnerError::Config {
                path: "scheduler".into(),
                message,
            }),
            None => Ok(()),
        }
    }
}

/// One prompt to roll out K times; its group comes back with `group_id = work_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    /// Unique per hand-out: `v{version}-p{prompt_index}-n{serial}`.
    pub work_id: String,
    /// Position of the prompt in the data set.
    pub prompt_index: u64,
    /// The prompt.
    pub prompt: Arc<Prompt>,
    /// Responses to sample.
    pub k: u32,
}

/// The answer to [`Scheduler::pull`].
#[derive(Debug, Clone, PartialEq)]
pub enum Pull {
    /// Work to sample with `policy_version` (fetch those weights first).
    Work {
        /// The version the responses must be sampled with.
        policy_version: u64,
        /// At least one item.
        items: Vec<Work>,
    },
    /// Nothing now (training, enough groups kept or too many prompts out); ask again later.
    Busy {
        /// How long to wait before asking again.
        retry_after: Duration,
    },
    /// The actor id was never registered or was forgotten after three silent leases; the
    /// actor registers again.
    UnknownActor,
}

/// The K responses of one work item, all sampled with one policy version.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The `work_id` of the item.
    pub group_id: String,
    /// The submitting actor; must be the one the work was handed to.
    pub actor_id: String,
    /// The version every response was sampled with.
    pub policy_version: u64,
    /// The prompt as received in the work item and exactly K scored responses: what the
    /// step trains on.
    pub scored: ScoredGroup,
}

/// What [`Scheduler::submit`] made of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Passed the filter; buffered for the next batch.
    Kept,
    /// Valid but dropped by the filter; its prompt is used up for this pass.
    Filtered,
    /// A group for this work, or for another hand-out of the same prompt, came first.
    Duplicate,
    /// Sampled with a version outside the staleness bound, or its work was cancelled; dropped.
    Stale,
    /// Malformed or unknown; the reason says which. The work stays out, so a corrected group
    /// may follow.
    Rejected(String),
}

/// Filter figures of the groups judged while one batch was collected, kept or not.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FilterStats {
    /// Groups judged.
    pub groups_seen: u64,
    /// Groups kept (the batch plus any surplus).
    pub groups_kept: u64,
    /// Groups dropped for a mean score below the lower bound.
    pub groups_too_hard: u64,
    /// Groups dropped for a mean score above the upper bound.
    pub groups_too_easy: u64,
    /// Groups dropped for a truncated response.
    pub groups_truncated: u64,
    /// Kept groups beyond B whose prompts went back to the queue.
    pub surplus_requeued: u64,
    /// `groups_kept / groups_seen`.
    pub pass_rate: f64,
    /// Mean over the groups seen of each group's mean score.
    pub mean_score: f64,
}

/// A training batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Exactly B groups, in arrival order.
    pub groups: Vec<Group>,
    /// The data-set position of each group's prompt.
    pub prompt_indices: Vec<u64>,
    /// The current version, which the step trains from (groups carry their own).
    pub policy_version: u64,
    /// How the filter fared while the batch was collected.
    pub stats: FilterStats,
}

/// What a checkpoint needs to resume the prompt order exactly; stored in
/// [`TrainerState`] (see [`SchedulerState::from_trainer_state`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// The current policy version.
    pub policy_version: u64,
    /// Prompts of the current pass already drawn.
    pub data_cursor: u64,
    /// Completed passes over the data.
    pub data_epoch: u64,
    /// Prompts drawn but not consumed, served first after a resume: those of kept groups not
    /// trained on yet, then those of work still out (hand-out order), then the queue.
    pub surplus_prompts: Vec<u64>,
}

impl SchedulerState {
    /// The scheduler's part of a checkpoint's trainer state.
    pub fn from_trainer_state(state: &TrainerState) -> Self {
        Self {
            policy_version: state.policy_version,
            data_cursor: state.data_cursor,
            data_epoch: state.data_epoch,
            surplus_prompts: state.surplus_prompts.clone(),
        }
    }

    /// Writes the data position into a trainer state about to be checkpointed (the policy
    /// version there is the trainer's: it is ahead of the scheduler's until it publishes).
    pub fn write_into(&self, state: &mut TrainerState) {
        state.data_cursor = self.data_cursor;
        state.data_epoch = self.data_epoch;
        state.surplus_prompts = self.surplus_prompts.clone();
    }
}

/// What the scheduler is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Handing out work and gathering groups.
    Collecting,
    /// A batch was taken and the new version is not published yet.
    Training,
}

impl From<Phase> for pb::LearnerPhase {
    /// The phase as `LearnerStatus.phase` reports it.
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Collecting => Self::Collecting,
            Phase::Training => Self::Training,
        }
    }
}

/// Running totals since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Groups kept by the filter.
    pub accepted: u64,
    /// Valid groups the filter dropped.
    pub filtered: u64,
    /// Groups that arrived after a group for the same hand-out or prompt.
    pub duplicates: u64,
    /// Groups dropped for their version, kept groups that aged out before training included.
    pub stale: u64,
    /// Malformed or unknown groups.
    pub rejected: u64,
    /// Leases that expired, their prompts queued again.
    pub reissued: u64,
    /// Work withdrawn because its version ran out, its prompts queued again.
    pub cancelled: u64,
}

/// The scheduler's figures at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerStatus {
    /// The current policy version.
    pub policy_version: u64,
    /// Collecting or training.
    pub phase: Phase,
    /// Prompts waiting: not yet drawn in this pass, plus the queue.
    pub pending_prompts: u64,
    /// Work the current step still waits for that no actor holds a live lease on: see
    /// [`work_backlog`]. What the actors' autoscaler follows.
    pub work_backlog: u64,
    /// Work handed out with a live lease.
    pub in_flight: u64,
    /// Kept groups waiting for a batch.
    pub groups_buffered: u64,
    /// Actors heard from within the last three leases.
    pub connected_actors: u32,
    /// Fraction of the most recent groups (up to 256) the filter kept; 0 before any.
    pub filter_pass_rate: f64,
    /// Completed passes over the data.
    pub data_epoch: u64,
    /// Running totals.
    pub counters: Counters,
}

/// What [`work_backlog`] is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacklogInputs {
    /// Whether work for the step is handed out now (not while an on-policy learner trains).
    pub handing_out: bool,
    /// Kept groups the step still lacks (B minus those buffered).
    pub missing_groups: u64,
    /// Share of recent groups the filter kept; `None` before the first group.
    pub pass_rate: Option<f64>,
    /// Work handed out whose lease has not run out.
    pub live_leases: u64,
    /// How many more items the scheduler would hand out now, leases that ran out not counted
    /// as out (its allowance: `oversample`, `max_outstanding_prompts`).
    pub room: u64,
}

/// The work the current step waits for: work items not leased yet plus leases that ran out,
/// bounded by what the step still needs. The step needs `missing_groups / pass_rate` items
/// (each item returns one group, and the filter keeps that share of them; before any group,
/// one item per missing group; with a filter that kept nothing recently, all the room there
/// is). Unleased work never runs short (the data order wraps into a new pass), so the backlog
/// is that need minus the live leases, and never more than the scheduler would hand out now.
/// Zero while no work is handed out; zero too when the live leases cover the need, i.e. when
/// the actors keep up.
pub fn work_backlog(inputs: BacklogInputs) -> u64 {
    if !inputs.handing_out || inputs.missing_groups == 0 {
        return 0;
    }
    let needed = match inputs.pass_rate {
        None => inputs.missing_groups,
        Some(rate) if rate > 0.0 => (inputs.missing_groups as f64 / rate.min(1.0)).ceil() as u64,
        Some(_) => u64::MAX,
    };
    needed.saturating_sub(inputs.live_leases).min(inputs.room)
}

/// One drawing of a prompt from the data. Hand-outs of it (the first, and any after a lease
/// expired) compete: the first group to arrive consumes the slot.
#[derive(Debug)]
struct Slot {
    prompt_index: u64,
    /// Waiting in the queue.
    queued: bool,
    /// The hand-out whose lease is live, if any.
    live_work: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkStatus {
    /// Lease live.
    Outstanding,
    /// Lease ran out; the prompt was queued again, a late group may still win.
    Expired,
    /// Its version ran out; a late group is stale.
    Cancelled,
    /// Another hand-out of the prompt delivered first.
    Superseded,
    /// A group for it was judged.
    Settled,
}

#[derive(Debug)]
struct WorkRecord {
    serial: u64,
    slot: u64,
    prompt_index: u64,
    policy_version: u64,
    actor_id: String,
    deadline: Instant,
    status: WorkStatus,
}

#[derive(Debug)]
struct KeptGroup {
    group: Group,
    prompt_index: u64,
}

#[derive(Debug, Default)]
struct FilterTally {
    seen: u64,
    kept: u64,
    too_hard: u64,
    too_easy: u64,
    truncated: u64,
    score_sum: f64,
}

impl FilterTally {
    fn add(&mut self, mean_score: f64, verdict: Verdict) {
        self.seen += 1;
        self.score_sum += mean_score;
        match verdict {
            Verdict::Kept => self.kept += 1,
            Verdict::TooHard => self.too_hard += 1,
            Verdict::TooEasy => self.too_easy += 1,
            Verdict::Truncated => self.truncated += 1,
        }
    }

    fn stats(&self, surplus_requeued: u64) -> FilterStats {
        let ratio = |x: f64| {
            if self.seen == 0 {
                0.0
            } else {
                x / self.seen as f64
            }
        };
        FilterStats {
            groups_seen: self.seen,
            groups_kept: self.kept,
            groups_too_hard: self.too_hard,
            groups_too_easy: self.too_easy,
            groups_truncated: self.truncated,
            surplus_requeued,
            pass_rate: ratio(self.kept as f64),
            mean_score: ratio(self.score_sum),
        }
    }
}

/// The prompt scheduler; see the module documentation for the rules.
#[derive(Debug)]
pub struct Scheduler {
    prompts: Vec<Arc<Prompt>>,
    config: SchedulerConfig,
    policy_version: u64,
    phase: Phase,
    data_epoch: u64,
    data_cursor: u64,
    /// This pass's permutation of the prompt indices.
    order: Vec<u64>,
    /// Slots served before new prompts, FIFO.
    queue: VecDeque<u64>,
    /// Slots not consumed yet; a missing slot was consumed by a group.
    slots: HashMap<u64, Slot>,
    next_slot: u64,
    /// Every hand-out of the versions a late group may still name.
    works: HashMap<String, WorkRecord>,
    /// Live leases by serial, i.e. in hand-out order.
    outstanding: BTreeMap<u64, String>,
    next_serial: u64,
    /// Kept groups in arrival order.
    buffer: Vec<KeptGroup>,
    /// Last time each known actor was heard from.
    actors: HashMap<String, Instant>,
    next_actor: u64,
    /// Tags this scheduler's actor and work ids, so ids handed out before a learner restart
    /// never collide with new ones.
    instance: String,
    tally: FilterTally,
    recent: VecDeque<bool>,
    counters: Counters,
}

impl Scheduler {
    /// A scheduler over `prompts`, fresh (version 0, epoch 0) or resumed from a checkpoint's
    /// `resume` state. Fails on an invalid config (`Config`), no or empty prompts, or a state
    /// that does not fit the data set (`Data`).
    pub fn new(
        prompts: Vec<Prompt>,
        config: SchedulerConfig,
        resume: Option<SchedulerState>,
    ) -> Result<Self> {
        config.validate()?;
        if prompts.is_empty() {
            return Err(LearnerError::Data("the scheduler has no prompts".into()));
        }
        if let Some(i) = prompts.iter().position(|p| p.prompt_ids.is_empty()) {
            return Err(LearnerError::Data(format!("prompt {i} has no tokens")));
        }
        let n = prompts.len() as u64;
        let mut state = resume.unwrap_or_default();
        if state.data_cursor > n {
            return Err(LearnerError::Data(format!(
                "resume state: data cursor {} is beyond the {n} prompts",
                state.data_cursor
            )));
        }
        if let Some(p) = state.surplus_prompts.iter().find(|&&p| p >= n) {
            return Err(LearnerError::Data(format!(
                "resume state: queued prompt {p} is beyond the {n} prompts"
            )));
        }
        if state.data_cursor == n {
            state.data_cursor = 0;
            state.data_epoch += 1;
        }
        let mut scheduler = Self {
            order: permutation(config.seed, state.data_epoch, n),
            prompts: prompts.into_iter().map(Arc::new).collect(),
            config,
            policy_version: state.policy_version,
            phase: Phase::Collecting,
            data_epoch: state.data_epoch,
            data_cursor: state.data_cursor,
            queue: VecDeque::new(),
            slots: HashMap::new(),
            next_slot: 0,
            works: HashMap::new(),
            outstanding: BTreeMap::new(),
            next_serial: 0,
            buffer: Vec::new(),
            actors: HashMap::new(),
            next_actor: 0,
            instance: instance_tag(),
            tally: FilterTally::default(),
            recent: VecDeque::new(),
            counters: Counters::default(),
        };
        for prompt_index in state.surplus_prompts {
            scheduler.queue_prompt(prompt_index);
        }
        Ok(scheduler)
    }

    /// Admits an actor; returns its id, `{actor_name}-{serial}` (unique: the serial is the
    /// digits after the last dash).
    pub fn register(&mut self, actor_name: &str, now: Instant) -> String {
        self.next_actor += 1;
        let name = if actor_name.is_empty() {
            "actor"
        } else {
            actor_name
        };
        let actor_id = format!("{name}-{}-{}", self.instance, self.next_actor);
        self.actors.insert(actor_id.clone(), now);
        tracing::info!(%actor_id, "actor registered");
        actor_id
    }

    /// Up to `max_prompts` (at least one) work items for `actor_id`, or `Busy` while training
    /// (on-policy), while B kept groups wait for [`Scheduler::take_batch`], or while the cap on
    /// prompts out is reached. Expires overdue leases first. An actor id never registered, or
    /// forgotten after three silent leases, gets `UnknownActor`: the actor registers again.
    pub fn pull(&mut self, actor_id: &str, max_prompts: usize, now: Instant) -> Pull {
        self.expire(now);
        match self.actors.get_mut(actor_id) {
            Some(last_seen) => *last_seen = now,
            None => return Pull::UnknownActor,
        }
        let room = self.config.room(self.outstanding.len(), self.buffer.len());
        let busy = (self.phase == Phase::Training && self.config.max_staleness == 0)
            || self.buffer.len() >= self.config.batch_groups
            || room == 0;
        if busy {
            return Pull::Busy {
                retry_after: RETRY_AFTER.min(self.config.lease / 2),
            };
        }
        // One actor takes at most its share of the allowance, so a round is spread over the
        // actors instead of queued behind the first to ask.
        let share = self.config.allowance().div_ceil(self.actors.len().max(1));
        let count = max_prompts.max(1).min(room).min(share);
        let items = (0..count).map(|_| self.hand_out(actor_id, now)).collect();
        Pull::Work {
            policy_version: self.policy_version,
            items,
        }
    }

    /// Judges a returned group; see [`Submitted`]. Checks, in order: the id was handed out
    /// (an unknown id from a version long gone is `Stale`), no group for this hand-out or its
    /// prompt came first, the version is within the staleness bound, the submitter is the
    /// work's actor, and the group's shape (prompt, K responses, token/log-prob lengths,
    /// scores in [0, 1]).
    pub fn submit(&mut self, group: Group, now: Instant) -> Submitted {
        let group_id = group.group_id.clone();
        let outcome = self.judge(group, now);
        let counter = match &outcome {
            Submitted::Kept => &mut self.counters.accepted,
            Submitted::Filtered => &mut self.counters.filtered,
            Submitted::Duplicate => &mut self.counters.duplicates,
            Submitted::Stale => &mut self.counters.stale,
            Submitted::Rejected(reason) => {
                tracing::warn!(%group_id, %reason, "group rejected");
                &mut self.counters.rejected
            }
        };
        *counter += 1;
        tracing::debug!(%group_id, ?outcome, "group submitted");
        outcome
    }

    /// Counts a group the service refused before it could be judged (it did not even convert
    /// from the wire form), like any other rejection.
    pub fn reject(&mut self, group_id: &str, reason: String) -> Submitted {
        tracing::warn!(%group_id, %reason, "group rejected");
        self.counters.rejected += 1;
        Submitted::Rejected(reason)
    }

    /// Once at least B groups are kept (and not while training): the first B in arrival order.
    /// Kept groups beyond them that would be stale after the next version (all of them when
    /// on-policy) have their prompts queued; work that would be stale is cancelled and its
    /// prompts queued. Switches to training.
    pub fn take_batch(&mut self) -> Option<Batch> {
        let b = self.config.batch_groups;
        if self.phase == Phase::Training || self.buffer.len() < b {
            return None;
        }
        let rest = self.buffer.split_off(b);
        let taken = std::mem::replace(&mut self.buffer, Vec::with_capacity(rest.len()));
        let next_version = self.policy_version + 1;
        let mut surplus_requeued = 0;
        for kept in rest {
            if self.outlives(kept.group.policy_version, next_version) {
                self.buffer.push(kept);
            } else {
                self.queue_prompt(kept.prompt_index);
                surplus_requeued += 1;
            }
        }
        self.cancel_older(next_version);
        let stats = self.tally.stats(surplus_requeued);
        self.tally = FilterTally::default();
        self.phase = Phase::Training;
        let (groups, prompt_indices) = taken
            .into_iter()
            .map(|kept| (kept.group, kept.prompt_index))
            .unzip();
        tracing::info!(
            policy_version = self.policy_version,
            groups_seen = stats.groups_seen,
            pass_rate = stats.pass_rate,
            surplus_requeued,
            "batch complete"
        );
        Some(Batch {
            groups,
            prompt_indices,
            policy_version: self.policy_version,
            stats,
        })
    }

    /// Training is done and `policy_version` (greater than the current one) is published:
    /// back to collecting. Kept groups and work that this version leaves too stale are dropped
    /// and their prompts queued; hand-outs older than any group that could still count are
    /// forgotten.
    pub fn publish(&mut self, policy_version: u64) {
        debug_assert!(
            policy_version > self.policy_version,
            "version {policy_version} published after {}",
            self.policy_version
        );
        if policy_version <= self.policy_version {
            tracing::warn!(
                policy_version,
                current = self.policy_version,
                "published version does not advance; ignored"
            );
            self.phase = Phase::Collecting;
            return;
        }
        self.policy_version = policy_version;
        self.phase = Phase::Collecting;
        let buffer = std::mem::take(&mut self.buffer);
        for kept in buffer {
            if self.outlives(kept.group.policy_version, policy_version) {
                self.buffer.push(kept);
            } else {
                self.queue_prompt(kept.prompt_index);
                self.counters.stale += 1;
            }
        }
        self.cancel_older(policy_version);
        // A group of a forgotten hand-out is stale by its version (see `submit`).
        let n = self.config.max_staleness;
        self.works
            .retain(|_, work| work.policy_version + n + 1 >= policy_version);
    }

    /// Queues again the prompts of leases due by `now` (counted as `reissued`) and forgets
    /// actors not heard from for three leases.
    pub fn expire(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, id)| self.works[*id].deadline <= now)
            .map(|(&serial, _)| serial)
            .collect();
        for serial in due {
            let work_id = self.outstanding.remove(&serial).expect("due lease");
            let work = self.works.get_mut(&work_id).expect("outstanding work");
            work.status = WorkStatus::Expired;
            let slot = work.slot;
            tracing::debug!(%work_id, actor_id = %work.actor_id, "lease expired");
            self.requeue_slot(slot);
            self.counters.reissued += 1;
        }
        let timeout = self.config.lease * ACTOR_TIMEOUT_LEASES;
        self.actors.retain(|actor_id, last_seen| {
            let alive = now.saturating_duration_since(*last_seen) < timeout;
            if !alive {
                tracing::info!(%actor_id, "actor forgotten after a long silence");
            }
            alive
        });
    }

    /// The figures now.
    pub fn status(&self, now: Instant) -> SchedulerStatus {
        let timeout = self.config.lease * ACTOR_TIMEOUT_LEASES;
        let connected = self
            .actors
            .values()
            .filter(|&&last_seen| now.saturating_duration_since(last_seen) < timeout)
            .count();
        let passed = self.recent.iter().filter(|&&kept| kept).count();
        let live_leases = self
            .outstanding
            .values()
            .filter(|id| self.works[*id].deadline > now)
            .count();
        let backlog = work_backlog(BacklogInputs {
            handing_out: self.phase == Phase::Collecting || self.config.max_staleness > 0,
            missing_groups: self.config.batch_groups.saturating_sub(self.buffer.len()) as u64,
            pass_rate: (!self.recent.is_empty()).then(|| passed as f64 / self.recent.len() as f64),
            live_leases: live_leases as u64,
            room: self.config.room(live_leases, self.buffer.len()) as u64,
        });
        SchedulerStatus {
            policy_version: self.policy_version,
            phase: self.phase,
            pending_prompts: self.prompts.len() as u64 - self.data_cursor + self.queue.len() as u64,
            work_backlog: backlog,
            in_flight: self.outstanding.len() as u64,
            groups_buffered: self.buffer.len() as u64,
            connected_actors: connected as u32,
            filter_pass_rate: if self.recent.is_empty() {
                0.0
            } else {
                passed as f64 / self.recent.len() as f64
            },
            data_epoch: self.data_epoch,
            counters: self.counters.clone(),
        }
    }

    /// Prompts of one rollout round, `ceil(B · oversample)`.
    pub fn round(&self) -> usize {
        self.config.round()
    }

    /// What a checkpoint needs: taken after the step that consumed the last batch, a resumed
    /// scheduler hands out exactly the prompts this one would have, in the same order (work
    /// still out and kept groups not trained on are sampled again, first).
    pub fn state(&self) -> SchedulerState {
        let buffered = self.buffer.iter().map(|kept| kept.prompt_index);
        let out = self
            .outstanding
            .values()
            .map(|id| self.works[id].prompt_index);
        let queued = self.queue.iter().map(|slot| self.slots[slot].prompt_index);
        SchedulerState {
            policy_version: self.policy_version,
            data_cursor: self.data_cursor,
            data_epoch: self.data_epoch,
            surplus_prompts: buffered.chain(out).chain(queued).collect(),
        }
    }

    /// Whether a group of `version` still counts once `next_version` is current.
    fn outlives(&self, version: u64, next_version: u64) -> bool {
        version + self.config.max_staleness >= next_version
    }

    /// Hands out the next slot: the queue first, then the data order.
    fn hand_out(&mut self, actor_id: &str, now: Instant) -> Work {
        let slot_id = match self.queue.pop_front() {
            Some(slot_id) => slot_id,
            None => {
                let prompt_index = self.draw();
                self.new_slot(prompt_index)
            }
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        let slot = self.slots.get_mut(&slot_id).expect("queued slot");
        let prompt_index = slot.prompt_index;
        let work_id = format!(
            "v{}-p{prompt_index}-n{serial}-{}",
            self.policy_version, self.instance
        );
        slot.queued = false;
        slot.live_work = Some(work_id.clone());
        self.works.insert(
            work_id.clone(),
            WorkRecord {
                serial,
                slot: slot_id,
                prompt_index,
                policy_version: self.policy_version,
                actor_id: actor_id.to_string(),
                deadline: now + self.config.lease,
                status: WorkStatus::Outstanding,
            },
        );
        self.outstanding.insert(serial, work_id.clone());
        Work {
            work_id,
            prompt_index,
            prompt: Arc::clone(&self.prompts[prompt_index as usize]),
            k: self.config.k,
        }
    }

    /// The next prompt of the data order, starting a new pass after the last one.
    fn draw(&mut self) -> u64 {
        let prompt_index = self.order[self.data_cursor as usize];
        self.data_cursor += 1;
        if self.data_cursor as usize == self.order.len() {
            self.data_epoch += 1;
            self.data_cursor = 0;
            self.order = permutation(self.config.seed, self.data_epoch, self.order.len() as u64);
        }
        prompt_index
    }

    fn new_slot(&mut self, prompt_index: u64) -> u64 {
        let slot_id = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(
            slot_id,
            Slot {
                prompt_index,
                queued: false,
                live_work: None,
            },
        );
        slot_id
    }

    /// Queues a prompt whose earlier drawing was consumed (surplus, aged-out group) or that
    /// comes from a resume state.
    fn queue_prompt(&mut self, prompt_index: u64) {
        let slot_id = self.new_slot(prompt_index);
        self.requeue_slot(slot_id);
    }

    fn requeue_slot(&mut self, slot_id: u64) {
        let slot = self.slots.get_mut(&slot_id).expect("live slot");
        slot.queued = true;
        slot.live_work = None;
        self.queue.push_back(slot_id);
    }

    /// Cancels the work, live or expired, whose groups would be stale once `next_version` is
    /// current; the prompts of live leases are queued in hand-out order.
    fn cancel_older(&mut self, next_version: u64) {
        let n = self.config.max_staleness;
        let doomed: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, id)| self.works[*id].policy_version + n < next_version)
            .map(|(&serial, _)| serial)
            .collect();
        for serial in doomed {
            let work_id = self.outstanding.remove(&serial).expect("doomed lease");
            let work = self.works.get_mut(&work_id).expect("outstanding work");
            work.status = WorkStatus::Cancelled;
            let slot = work.slot;
            self.requeue_slot(slot);
            self.counters.cancelled += 1;
        }
        for work in self.works.values_mut() {
            if work.status == WorkStatus::Expired && work.policy_version + n < next_version {
                work.status = WorkStatus::Cancelled;
            }
        }
    }

    /// Ends a hand-out: its lease, if live, stops counting and its slot forgets it.
    fn retire(&mut self, work_id: &str, status: WorkStatus) {
        let work = self.works.get_mut(work_id).expect("known work");
        if work.status == WorkStatus::Outstanding {
            self.outstanding.remove(&work.serial);
            if let Some(slot) = self.slots.get_mut(&work.slot) {
                if slot.live_work.as_deref() == Some(work_id) {
                    slot.live_work = None;
                }
            }
        }
        work.status = status;
    }

    fn judge(&mut self, group: Group, now: Instant) -> Submitted {
        if let Some(last_seen) = self.actors.get_mut(&group.actor_id) {
            *last_seen = now;
        }
        let Some(work) = self.works.get(&group.group_id) else {
            return match work_id_version(&group.group_id) {
                Some(version) if version + self.config.max_staleness < self.policy_version => {
                    Submitted::Stale
                }
                _ => Submitted::Rejected(format!(
                    "group_id {:?} is not a work id handed out",
                    group.group_id
                )),
            };
        };
        let (status, slot_id, prompt_index) = (work.status, work.slot, work.prompt_index);
        match status {
            WorkStatus::Cancelled => {
                self.retire(&group.group_id, WorkStatus::Settled);
                return Submitted::Stale;
            }
            WorkStatus::Settled | WorkStatus::Superseded => return Submitted::Duplicate,
            WorkStatus::Outstanding | WorkStatus::Expired => {}
        }
        if !self.slots.contains_key(&slot_id) {
            // Another hand-out of the same prompt delivered first.
            self.retire(&group.group_id, WorkStatus::Settled);
            return Submitted::Duplicate;
        }
        if group.actor_id != work.actor_id {
            return Submitted::Rejected(format!(
                "group {} was handed to actor {}, not {}",
                group.group_id, work.actor_id, group.actor_id
            ));
        }
        if group.policy_version > self.policy_version {
            return Submitted::Rejected(format!(
                "group {} claims policy version {}, newer than the current {}",
                group.group_id, group.policy_version, self.policy_version
            ));
        }
        if group.policy_version + self.config.max_staleness < self.policy_version {
            let was_live = status == WorkStatus::Outstanding;
            self.retire(&group.group_id, WorkStatus::Settled);
            if was_live {
                self.requeue_slot(slot_id);
            }
            return Submitted::Stale;
        }
        let prompt = &self.prompts[prompt_index as usize];
        if let Err(reason) = check_shape(&group, prompt, &self.config) {
            return Submitted::Rejected(format!("group {}: {reason}", group.group_id));
        }

        // Accepted: this hand-out consumes the slot, and any other hand-out of it loses.
        self.retire(&group.group_id, WorkStatus::Settled);
        let slot = self.slots.remove(&slot_id).expect("live slot");
        if slot.queued {
            self.queue.retain(|&queued| queued != slot_id);
        }
        if let Some(other) = slot.live_work {
            self.retire(&other, WorkStatus::Superseded);
        }
        self.renew_leases(&group.actor_id, now);

        let mean_score = group.scored.responses.iter().map(|r| r.score).sum::<f64>()
            / group.scored.responses.len() as f64;
        let any_truncated = group.scored.responses.iter().any(|r| r.truncated);
        let verdict = verdict(mean_score, any_truncated, &self.config.filter);
        self.tally.add(mean_score, verdict);
        if self.recent.len() == RECENT_GROUPS {
            self.recent.pop_front();
        }
        self.recent.push_back(verdict == Verdict::Kept);
        if verdict == Verdict::Kept {
            self.buffer.push(KeptGroup {
                group,
                prompt_index,
            });
            Submitted::Kept
        } else {
            Submitted::Filtered
        }
    }

    /// An actor that delivers is alive: its other leases run from now.
    fn renew_leases(&mut self, actor_id: &str, now: Instant) {
        let deadline = now + self.config.lease;
        for work_id in self.outstanding.values() {
            let work = self.works.get_mut(work_id).expect("outstanding work");
            if work.actor_id == actor_id {
                work.deadline = work.deadline.max(deadline);
            }
        }
    }
}

/// The prompt order of pass `epoch`: a shuffle by `ChaCha8Rng` seeded with `seed + epoch`.
/// Eight hex digits that differ between scheduler instances (process id and start time).
fn instance_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = (nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:08x}", mixed >> 32)
}

fn permutation(seed: u64, epoch: u64, n: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch)));
    order
}

/// The version in a work id of the form `v{version}-…`.
fn work_id_version(work_id: &str) -> Option<u64> {
    work_id.strip_prefix('v')?.split('-').next()?.parse().ok()
}

/// Whether `group` fits the prompt it was handed out for, with K well-formed responses.
fn check_shape(
    group: &Group,
    prompt: &Prompt,
    config: &SchedulerConfig,
) -> std::result::Result<(), String> {
    let k = config.k;
    if group.scored.prompt_ids != prompt.prompt_ids {
        return Err(format!(
            "prompt_ids ({} tokens) differ from the work's prompt ({} tokens)",
            group.scored.prompt_ids.len(),
            prompt.prompt_ids.len()
        ));
    }
    if group.scored.responses.len() != k as usize {
        return Err(format!(
            "{} responses, but K = {k}",
            group.scored.responses.len()
        ));
    }
    for (i, response) in group.scored.responses.iter().enumerate() {
        if response.ids.is_empty() {
            return Err(format!("response {i} has no tokens"));
        }
        if response.ids.len() > config.max_response_tokens {
            return Err(format!(
                "response {i} has {} tokens, over the limit of {}",
                response.ids.len(),
                config.max_response_tokens
            ));
        }
        if let Some(id) = response
            .ids
            .iter()
            .find(|&&id| !(0..config.vocab_size).contains(&id))
        {
            return Err(format!(
                "response {i} has the token id {id}, outside the vocabulary 0..{}",
                config.vocab_size
            ));
        }
        if response.sampling_logprobs.len() != response.ids.len() {
            return Err(format!(
                "response {i} has {} sampling log-probs for {} tokens",
                response.sampling_logprobs.len(),
                response.ids.len()
            ));
        }
        if response.sampling_logprobs.iter().any(|lp| !lp.is_finite()) {
            return Err(format!("response {i} has a non-finite sampling log-prob"));
        }
        if !(0.0..=1.0).contains(&response.score) {
            return Err(format!(
                "response {i} has the score {}, outside [0, 1]",
                response.score
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::ScoredResponse;

    const SEED: u64 = 7;

    /// Prompt `i` is the single token `100 + i`.
    fn prompts(n: usize) -> Vec<Prompt> {
        (0..n)
            .map(|i| Prompt {
                prompt_ids: vec![100 + i as i64],
                ground_truth: i.to_string(),
                ability: Ability::Math,
                data_source: String::new(),
                extra_info: String::new(),
            })
            .collect()
    }

    fn config(batch_groups: usize) -> SchedulerConfig {
        SchedulerConfig {
            batch_groups,
            k: 4,
            max_staleness: 0,
            lease: Duration::from_secs(10),
            filter: FilterConfig::default(),
            seed: SEED,
            // Four rounds' worth out at once, as the authors' recipe samples (spec §5.2), so
            // the tests below can take surplus groups; `oversample_1_*` test the bound itself.
            oversample: 4.0,
            max_outstanding_prompts: 0,
            vocab_size: 1000,
            max_response_tokens: 16,
        }
    }

    /// The data order the spec asks for, computed here from scratch.
    fn expected_order(n: u64, epoch: u64) -> Vec<u64> {
        let mut order: Vec<u64> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(SEED + epoch));
        order
    }

    /// A group for `work` in which `correct` of the K responses score 1.
    fn group(work: &Work, actor_id: &str, policy_version: u64, correct: u32) -> Group {
        Group {
            group_id: work.work_id.clone(),
            actor_id: actor_id.into(),
            policy_version,
            scored: ScoredGroup {
                prompt_ids: work.prompt.prompt_ids.clone(),
                responses: (0..work.k)
                    .map(|i| ScoredResponse {
                        ids: vec![1, 2, 3],
                        sampling_logprobs: vec![-0.5, -1.0, -0.1],
                        score: if i < correct { 1.0 } else { 0.0 },
                        truncated: false,
                    })
                    .collect(),
            },
        }
    }

    fn items(pull: Pull) -> (u64, Vec<Work>) {
        match pull {
            Pull::Work {
                policy_version,
                items,
            } => (policy_version, items),
            other => panic!("expected work, got {other:?}"),
        }
    }

    fn is_busy(pull: Pull) -> bool {
        matches!(pull, Pull::Busy { .. })
    }

    fn indices(works: &[Work]) -> Vec<u64> {
        works.iter().map(|w| w.prompt_index).collect()
    }

    #[test]
    fn collects_b_kept_groups_across_pulls() {
        let t = Instant::now();
        let mut s = Scheduler::new(prompts(40), config(4), None).unwrap();
        let actor = s.register("a", t);
        // Correct answers out of 4 for prompt i: i % 5, so 1-3 correct (mean 0.25-0.75) pass.
        let correct = |i: u64| (i % 5) as u32;
        let mut handed = Vec::new();
        let mut arrivals = Vec::new();
        while s.status(t).groups_buffered < 4 {
            let (version, works) = items(s.pull(&actor, 3, t));
            assert_eq!(version, 0);
            assert_eq!(works.len(), 3);
            handed.extend(indices(&works));
            // Submitted in reverse: the batch follows arrival order, not hand-out order.
            for work in works.iter().rev() {
                let expected = if (1..=3).contains(&correct(work.prompt_index)) {
                    Submitted::Kept
                } else {
                    Submitted::Filtered
                };
                let outcome = s.submit(group(work, &actor, 0, correct(work.prompt_index)), t);
                assert_eq!(outcome, expected);
                arrivals.push(work.prompt_index);
            }
        }
        assert_eq!(handed, expected_order(40, 0)[..handed.len()]);
        assert!(
            is_busy(s.pull(&actor, 3, t)),
            "B kept groups wait for take_batch"
        );

        let kept: Vec<u64> = arrivals
            .iter()
            .copied()
            .filter(|&i| (1..=3).contains(&correct(i)))
            .collect();
        let batch = s.take_batch().unwrap();
        assert_eq!(batch.policy_version, 0);
        assert_eq!(batch.prompt_indices, kept[..4]);
        for (group, &i) in batch.groups.iter().zip(&batch.prompt_indices) {
            assert_eq!(group.scored.prompt_ids, vec![100 + i as i64]);
        }
        let seen = arrivals.len() as u64;
        let mean = arrivals
            .iter()
            .map(|&i| correct(i) as f64 / 4.0)
            .sum::<f64>()
            / seen as f64;
        let stats = &batch.stats;
        assert_eq!(stats.groups_seen, seen);
        assert_eq!(stats.groups_kept, kept.len() as u64);
        assert_eq!(
            stats.groups_too_hard,
            arrivals.iter().filter(|&&i| correct(i) == 0).count() as u64
        );
        assert_eq!(
            stats.groups_too_easy,
            arrivals.iter().filter(|&&i| correct(i) == 4).count() as u64
        );
        assert_eq!(stats.surplus_requeued, kept.len() as u64 - 4);
        assert!((stats.pass_rate - kept.len() as f64 / seen as f64).abs() < 1e-12);
        assert!((stats.mean_score - mean).abs() < 1e-12);
        let status = s.status(t);
        assert_eq!(status.counters.accepted, kept.len() as u64);
        assert_eq!(status.counters.filtered, seen - kept.len() as u64);
        assert_eq!(status.phase, Phase::Training);
        assert_eq!(status.groups_buffered, 0);
    }

    #[test]
    fn the_backlog_is_what_the_step_needs_minus_live_leases() {
        let inputs = |missing, pass_rate, live| BacklogInputs {
            handing_out: true,
            missing_groups: missing,
            pass_rate,
            live_leases: live,
            room: 32,
        };
        // Before any group: one item per missing group.
        assert_eq!(work_backlog(inputs(8, None, 0)), 8);
        assert_eq!(work_backlog(inputs(8, None, 5)), 3);
        assert_eq!(work_backlog(inputs(8, None, 9)), 0, "the actors keep up");
        // Half the groups pass: 8 missing groups need 16 items; a third: ceil(24.000..) = 24.
        assert_eq!(work_backlog(inputs(8, Some(0.5), 4)), 12);
        assert_eq!(work_backlog(inputs(8, Some(1.0 / 3.0), 0)), 24);
        // Bounded by the room left; a filter that kept nothing asks for all of it.
        assert_eq!(work_backlog(inputs(8, Some(0.1), 2)), 32);
        assert_eq!(work_backlog(inputs(8, Some(0.0), 2)), 32);
        let little_room = BacklogInputs {
            room: 5,
            ..inputs(8, None, 0)
        };
        assert_eq!(work_backlog(little_room), 5);
        // Nothing when the step is complete or nothing is handed out.
        assert_eq!(work_backlog(inputs(0, Some(0.5), 0)), 0);
        let training = BacklogInputs {
            handing_out: false,
            ..inputs(8, None, 0)
        };
        assert_eq!(work_backlog(training), 0);
    }

    #[test]
    fn the_backlog_rises_under_backlog_and_falls_when_actors_keep_up() {
        let t = Instant::now();
        let lease = Duration::from_secs(10);
        let mut s = Scheduler::new(prompts(40), config(4), None).unwrap();
        let a = s.register("a", t);
        let backlog = |s: &Scheduler, at| s.status(at).work_backlog;
        // The data set holds 40 prompts, but the step waits for 4 groups.
        assert_eq!(s.status(t).pending_prompts, 40);
        assert_eq!(backlog(&s, t), 4);
        let (_, first) = items(s.pull(&a, 3, t));
        assert_eq!(backlog(&s, t), 1);
        let (_, second) = items(s.pull(&a, 1, t));
        assert_eq!(backlog(&s, t), 0, "four items out cover the step");
        // The actor falls silent: once its leases run out, the work waits again (before and
        // after `expire` queues it).
        assert_eq!(backlog(&s, t + lease - Duration::from_millis(1)), 0);
        assert_eq!(backlog(&s, t + lease), 4);
        s.expire(t + lease);
        assert_eq!(backlog(&s, t + lease), 4);
        // Late groups still count (first one wins): 2 kept and 2 filtered, so half pass and
        // the 2 missing groups need 4 more items.
        let later = t + lease + Duration::from_secs(1);
        for (work, correct) in first.iter().chain(&second).zip([2, 0, 2, 4]) {
            s.submit(group(work, &a, 0, correct), later);
        }
        assert_eq!(s.status(later).groups_buffered, 2);
        assert_eq!(s.status(later).filter_pass_rate, 0.5);
        assert_eq!(backlog(&s, later), 4);
        let (_, third) = items(s.pull(&a, 3, later));
        assert_eq!(backlog(&s, later), 1);
        for work in &third {
            s.submit(group(work, &a, 0, 2), later);
        }
        // B kept groups: nothing is needed, and nothing while the learner trains.
        assert_eq!(backlog(&s, later), 0);
        s.take_batch().unwrap();
        assert_eq!(backlog(&s, later), 0);
        // The next version: a whole step is waiting again (4 groups at a pass rate of 5/7).
        s.publish(1);
        assert_eq!(backlog(&s, later), (4.0_f64 * 7.0 / 5.0).ceil() as u64);
    }

    #[test]
    fn surplus_prompts_are_served_first_next_time() {
        let t = Instant::now();
        let mut s = Scheduler::new(prompts(20), config(3), None).unwrap();
        let actor = s.register("a", t);
        let (_, works) = items(s.pull(&actor, 5, t));
        let order = expected_order(20, 0);
        assert_eq!(indices(&works), order[..5]);
        for i in [4, 0, 2, 1, 3] {
            assert_eq!(s.submit(group(&works[i], &actor, 0, 2), t), Submitted::Kept);
        }
        let batch = s.take_batch().unwrap();
        assert_eq!(
            batch.prompt_indices,
            [order[4], order[0], order[2]],
            "the first B in arrival order"
        );
        assert_eq!(batch.stats.surplus_requeued, 2);
        assert_eq!(s.state().surplus_prompts, [order[1], order[3]]);
        assert_eq!(s.status(t).pending_prompts, 15 + 2);
        s.publish(1);
        let (version, works) = items(s.pull(&actor, 4, t));
        assert_eq!(version, 1);
        assert_eq!(
            indices(&works),
            [order[1], order[3], order[5], order[6]],
            "surplus first, then the data order"
        );
        assert!(works.iter().all(|w| w.work_id.starts_with("v1-")));
    }

    #[test]
    fn duplicates_count_once_and_malformed_groups_are_rejected() {
        let t = Instant::now();
        let mut s = Scheduler::new(prompts(10), config(8), None).unwrap();
        let a = s.register("a", t);
        let b = s.register("a", t);
        assert_ne!(a, b, "actor ids are unique even for one name");
        let (_, works) = items(s.pull(&a, 2, t));
        let good = group(&works[0], &a, 0, 1);
        assert_eq!(s.submit(good.clone(), t), Submitted::Kept);
        assert_eq!(s.submit(good.clone(), t), Submitted::Duplicate);
        assert_eq!(s.submit(good, t), Submitted::Duplicate);

        let reason = |outcome: Submitted| match outcome {
            Submitted::Rejected(reason) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        };
        let work = &works[1];
        let mut unknown = group(work, &a, 0, 1);
        unknown.group_id = "v0-p3-n999".into();
        assert!(reason(s.submit(unknown, t)).contains("not a work id"));
        let mut wrong_prompt = group(work, &a, 0, 1);
        wrong_prompt.scored.prompt_ids.push(5);
        assert!(reason(s.submit(wrong_prompt, t)).contains("prompt_ids"));
        let mut short = group(work, &a, 0, 1);
        short.scored.responses.pop();
        assert!(reason(s.submit(short, t)).contains("3 responses, but K = 4"));
        for bad_score in [1.5, -0.1, f64::NAN] {
            let mut bad = group(work, &a, 0, 1);
            bad.scored.responses[2].score = bad_score;
            assert!(reason(s.submit(bad, t)).contains("outside [0, 1]"));
        }
        let mut lengths = group(work, &a, 0, 1);
        lengths.scored.responses[0].sampling_logprobs.pop();
        assert!(reason(s.submit(lengths, t)).contains("log-probs for 3 tokens"));
        let mut empty = group(work, &a, 0, 1);
        empty.scored.responses[1].ids.clear();
        empty.scored.responses[1].sampling_logprobs.clear();
        assert!(reason(s.submit(empty, t)).contains("no tokens"));
        for bad_id in [-1, 1000, i64::MAX] {
            let mut bad = group(work, &a, 0, 1);
            bad.scored.responses[0].ids[1] = bad_id;
            assert!(reason(s.submit(bad, t)).contains("outside the vocabulary 0..1000"));
        }
        let mut long = group(work, &a, 0, 1);
        long.scored.responses[3].ids = vec![1; 17];
        long.scored.responses[3].sampling_logprobs = vec![-0.1; 17];
        assert!(reason(s.submit(long, t)).contains("17 tokens, over the limit of 16"));
        assert!(reason(s.submit(group(work, &b, 0, 1), t)).contains("handed to actor"));
        assert!(reason(s.submit(group(work, &a, 1, 1), t)).contains("newer than"));

        // The work is still out: a well-formed group for it counts.
        assert_eq!(s.status(t).in_flight, 1);
        assert_eq!(s.submit(group(work, &a, 0, 4), t), Submitted::Filtered);
        let counters = s.status(t).counters;
        assert_eq!(counters.accepted, 1);
        assert_eq!(counters.filtered, 1);
        assert_eq!(counters.duplicates, 2);
        assert_eq!(counters.rejected, 14);
        assert_eq!(s.status(t).groups_buffered, 1);
        assert_eq!(s.pull("nobody-1", 1, t), Pull::UnknownActor);
    }

    #[test]
    fn on_policy_stale_groups_are_dropped_and_training_is_busy() {
        let t = Instant::now();
        let mut s = Scheduler::new(prompts(10), config(1), None).unwrap();
        let actor = s.register("a", t);
        let (_, works) = items(s.pull(&actor, 3, t));
        let order = expected_order(10, 0);
        assert_eq!(s.submit(group(&works[1], &actor, 0, 2), t), Submitted::Kept);
        assert!(s.take_batch().is_some());
        assert!(s.take_batch().is_none(), "one batch per version");
        assert!(is_busy(s.pull(&actor, 3, t)), "no work while training");
        let status = s.status(t);
        assert_eq!((status.phase, status.in_flight), (Phase::Training, 0));
        assert_eq!(status.counters.cancelled, 2);
        // The cancelled work's prompts went back to the queue, in hand-out order.
        assert_eq!(s.state().surplus_prompts, [order[0], order[2]]);
        assert_eq!(
            s.submit(group(&works[0], &actor, 0, 2), t),
            Submitted::Stale
        );
        assert_eq!(
            s.submit(group(&works[0], &actor, 0, 2), t),
            Submitted::Duplicate
        );

        s.publish(1);
        assert_eq!(s.status(t).phase, Phase::Collecting);
        assert_eq!(
            s.submit(group(&works[2], &actor, 0, 2), t),
            Submitted::Stale
        );
        let (version, fresh) = items(s.pull(&actor, 3, t));
        assert_eq!(version, 1);
        assert_eq!(indices(&fresh), [order[0], order[2], order[3]]);
        // Sampled with the old weights although handed out for version 1: stale, and the
        // prompt is queued again.
        assert_eq!(
            s.submit(group(&fresh[2], &actor, 0, 2), t),
            Submitted::Stale
        );
        assert_eq!(s.state().surplus_prompts, [order[0], order[2], order[3]]);
        assert_eq!(s.status(t).counters.stale, 3);
        assert_eq!(s.submit(group(&fresh[0], &actor, 1, 2), t), Submitted::Kept);

        // Two versions on, the old records are forgotten but their ids still read as stale.
        assert!(s.take_batch().is_some());
        s.publish(2);
        assert!(s.take_batch().is_none());
        s.publish(3);
        assert_eq!(
            s.submit(group(&works[1], &actor, 0, 2), t),
            Submitted::Stale
        );
    }

    #[test]
    fn expired_leases_are_reissued_and_the_first_group_wins() {
        let t = Instant::now();
        let lease = Duration::from_secs(10);
        let mut s = Scheduler::new(prompts(10), config(8), None).unwrap();
        let a = s.register("a", t);
        let b = s.register("b", t);
        let (_, first) = items(s.pull(&a, 2, t));
        s.expire(t + lease - Duration::from_millis(1));
        assert_eq!(s.status(t).in_flight, 2, "not due yet");

        // Both leases expire; b is handed the same prompts under new ids.
        s.expire(t + lease);
        let status = s.status(t + lease);
        assert_eq!((status.in_flight, status.counters.reissued), (0, 2));
        let (_, second) = items(s.pull(&b, 2, t + lease));
        assert_eq!(indices(&second), indices(&first));
        assert!(second
            .iter()
            .zip(&first)
            .all(|(x, y)| x.work_id != y.work_id));

        // Prompt 0: the late original wins, the reissue is a duplicate.
        let late = t + lease + Duration::from_secs(1);
        assert_eq!(s.submit(group(&first[0], &a, 0, 1), late), Submitted::Kept);
        assert_eq!(s.status(late).in_flight, 1, "the reissue no longer counts");
        assert_eq!(
            s.submit(group(&second[0], &b, 0, 1), late),
            Submitted::Duplicate
        );
        // Prompt 1: the reissue wins, the late original is a duplicate.
        assert_eq!(s.submit(group(&second[1], &b, 0, 1), late), Submitted::Kept);
        assert_eq!(
            s.submit(group(&first[1], &a, 0, 1), late),
            Submitted::Duplicate
        );
        assert_eq!(s.status(late).counters.duplicates, 2);
        assert_eq!(s.status(late).groups_buffered, 2);

        // A late original that arrives before anyone took the queued copy withdraws it.
        let (_, third) = items(s.pull(&a, 1, late));
        let later = late + lease;
        s.expire(later);
        let kept = [first[0].prompt_index, second[1].prompt_index];
        let queued = third[0].prompt_index;
        assert_eq!(s.state().surplus_prompts, [kept[0], kept[1], queued]);
        assert_eq!(s.status(later).pending_prompts, 7 + 1);
        assert_eq!(s.submit(group(&third[0], &a, 0, 3), later), Submitted::Kept);
        assert_eq!(s.state().surplus_prompts, [kept[0], kept[1], queued]);
        assert_eq!(
            s.status(later).pending_prompts,
            7,
            "the queued copy was withdrawn"
        );
        let (_, next) = items(s.pull(&a, 1, later));
        assert_eq!(indices(&next), [expected_order(10, 0)[3]]);
    }

    #[test]
    fn delivering_renews_an_actors_leases_and_silent_actors_are_forgotten() {
        let t = Instant::now();
        let lease = Duration::from_secs(10);
        let mut s = Scheduler::new(prompts(10), config(8), None).unwrap();
        let a = s.register("a", t);
        let b = s.register("b", t);
        let (_, mine) = items(s.pull(&a, 2, t));
        let (_, theirs) = items(s.pull(&b, 1, t));
        let progress = t + Duration::from_secs(8);
        assert_eq!(
            s.submit(group(&mine[0], &a, 0, 1), progress),
            Submitted::Kept
        );
        s.expire(t + lease);
        let status = s.status(t + lease);
        assert_eq!(
            status.in_flight, 1,
            "a's other lease was renewed, b's expired"
        );
        // Kept, still out, queued again.
        assert_eq!(
            s.state().surplus_prompts,
            [
                mine[0].prompt_index,
                mine[1].prompt_index,
                theirs[0].prompt_index
            ]
        );
        s.expire(progress + lease);
        assert_eq!(s.status(progress + lease).in_flight, 0);

        assert_eq!(s.status(progress).connected_actors, 2);
        // b was last heard from at t, a at `progress`.
        assert_eq!(s.status(t + lease * 3).connected_actors, 1);
        assert_eq!(
            s.pull(&b, 1, t + lease * 3),
            Pull::UnknownActor,
            "b is forgotten"
        );
        assert!(matches!(s.pull(&a, 1, t + lease * 3), Pull::Work { .. }));
    }

    /// Pulls three prompts at a time and returns groups for the first two (1-3 of 4 correct,
    /// none for every fourth prompt) until a batch is complete; returns the prompts handed
    /// out. The third is left out, so take_batch has work to cancel.
    fn collect_batch(s: &mut Scheduler, actor: &str) -> Vec<u64> {
        let t = Instant::now();
        let correct = |i: u64| {
            if i.is_multiple_of(4) {
                0
            } else {
                (i % 3) as u32 + 1
            }
        };
        let mut handed = Vec::new();
        while s.take_batch().is_none() {
            let (version, works) = items(s.pull(actor, 3, t));
            handed.extend(indices(&works));
            for work in &works[..2] {
                s.submit(group(work, actor, version, correct(work.prompt_index)), t);
            }
        }
        handed
    }

    #[test]
    fn a_resumed_scheduler_hands_out_the_same_prompts() {
        let t = Instant::now();
        let mut a = Scheduler::new(prompts(13), config(5), None).unwrap();
        let actor = a.register("a", t);
        for version in 1..=2 {
            collect_batch(&mut a, &actor);
            a.publish(version);
        }
        // A checkpoint is written after a batch is taken (the trainer saves the version it is
        // about to publish).
        collect_batch(&mut a, &actor);
        let state = SchedulerState {
            policy_version: 3,
            ..a.state()
        };
        assert!(
            !state.surplus_prompts.is_empty(),
            "surplus and cancelled work"
        );
        a.publish(3);
        let mut b = Scheduler::new(prompts(13), config(5), Some(state.clone())).unwrap();
        let b_actor = b.register("b", t);
        assert_eq!(b.status(t).policy_version, 3);
        let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
        for version in 4..=8 {
            from_a.extend(collect_batch(&mut a, &actor));
            from_b.extend(collect_batch(&mut b, &b_actor));
            a.publish(version);
            b.publish(version);
        }
        assert_eq!(from_a, from_b);
        assert_eq!(a.state(), b.state());
        assert!(
            b.state().data_epoch > state.data_epoch,
            "the runs crossed an epoch"
        );
        // The queue first, then the data order from the saved cursor.
        let queued = state.surplus_prompts.len();
        assert_eq!(from_b[..queued], state.surplus_prompts);
        let next_new = expected_order(13, state.data_epoch)[state.data_cursor as usize];
        assert_eq!(from_b[queued], next_new);
    }

    #[test]
    fn a_state_taken_mid_collection_lists_every_unconsumed_prompt() {
        let t = Instant::now();
        let mut s = Scheduler::new(prompts(20), config(5), None).unwrap();
        let actor = s.register("a", t);
        let (_, works) = items(s.pull(&actor, 4, t));
        assert_eq!(s.submit(group(&works[2], &actor, 0, 2), t), Submitted::Kept);
        assert_eq!(
            s.submit(group(&works[3], &actor, 0, 0), t),
            Submitted::Filtered
        );
        s.expire(t + Duration::from_secs(10)); // works[0] and works[1] go back to the queue
        let (_, more) = items(s.pull(&actor, 3, t + Duration::from_secs(10)));
        assert_eq!(indices(&more)[..2], indices(&works)[..2]);
        s.expire(t + Duration::from_secs(20)); // all three again
        let (_, last) = items(s.pull(&actor, 1, t + Duration::from_secs(20)));
        let state = s.state();
        // Kept group, work out, then the queue; the filtered prompt is used up.
        let expected = [
            works[2].prompt_index,
            last[0].prompt_index,
            more[1].prompt_index,
            more[2].prompt_index,
        ];
        assert_eq!(last[0].prompt_index, more[0].prompt_index);
        assert_eq!(state.surplus_prompts, expected);
        assert_eq!((state.data_epoch, state.data_cursor), (0, 5));

        // JSON and the trainer state carry it unchanged.
        let json = serde_json::to_string(&state).unwrap();
        let mut trainer_state = TrainerState {
            step: 0,
            policy_version: state.policy_version,
            data_cursor: 0,
            data_epoch: 0,
            rng: crate::checkpoint::RngState::capture(&ChaCha8Rng::seed_from_u64(0)),
            surplus_prompts: Vec::new(),
            extra: serde_json::Value::Null,
        };
        serde_json::from_str::<SchedulerState>(&json)
            .unwrap()
            .write_into(&mut trainer_state);
        let restored = SchedulerState::from_trainer_state(&trainer_state);
        assert_eq!(restored, state);

        let mut resumed = Scheduler::new(prompts(20), config(5), Some(restored)).unwrap();
        let actor = resumed.register("a", t);
        let (_, first) = items(resumed.pull(&actor, 5, t));
        assert_eq!(indices(&first)[..4], expected);
        assert_eq!(first[4].prompt_index, expected_order(20, 0)[5]);

        let bad_cursor = SchedulerState {
            data_cursor: 21,
            ..state.clone()
        };
        assert!(Scheduler::new(prompts(20), config(5), Some(bad_cursor)).is_err());
        let bad_prompt = SchedulerState {
            surplus_prompts: vec![20],
            ..state
        };
        assert!(Scheduler::new(prompts(20), config(5), Some(bad_prompt)).is_err());
    }

    #[test]
    fn the_data_order_wraps_into_a_new_shuffle_each_epoch() {
        let t = Instant::now();
        let config = SchedulerConfig {
            oversample: 1.0,
            max_outstanding_prompts: 100,
            ..config(1)
        };
        let mut s = Scheduler::new(prompts(5), config.clone(), None).unwrap();
        let actor = s.register("a", t);
        let mut handed = Vec::new();
        for _ in 0..12 {
            handed.extend(indices(&items(s.pull(&actor, 1, t)).1));
        }
        let epochs = [
            expected_order(5, 0),
            expected_order(5, 1),
            expected_order(5, 2),
        ];
        assert_ne!(epochs[0], epochs[1], "each epoch has its own shuffle");
        assert_eq!(handed[..5], epochs[0]);
        assert_eq!(handed[5..10], epochs[1]);
        assert_eq!(handed[10..], epochs[2][..2]);
        let state = s.state();
        assert_eq!((state.data_epoch, state.data_cursor), (2, 2));
        assert_eq!(state.surplus_prompts, handed, "all of it still out");
        assert_eq!(s.status(t).pending_prompts, 3);
        // A cursor at the end of a pass resumes at the start of the next.
        let at_end = SchedulerState {
            data_cursor: 5,
            data_epoch: 0,
            ..SchedulerState::default()
        };
        let mut s = Scheduler::new(prompts(5), config, Some(at_end)).unwrap();
        let actor = s.register("a", t);
        assert_eq!(indices(&items(s.pull(&actor, 5, t)).1), epochs[1]);
    }

    #[test]
    fn the_in_flight_cap_applies() {
        let t = Instant::now();
        let mut s = Scheduler::new(prompts(50), config(2), None).unwrap();
        let actor = s.register("a", t);
        assert_eq!(items(s.pull(&actor, 5, t)).1.len(), 5);
        assert_eq!(items(s.pull(&actor, 5, t)).1.len(), 3, "ceil(B · 4) = 8");
        assert!(is_busy(s.pull(&actor, 5, t)));
        assert_eq!(
            items(s.pull(&actor, 0, t + Duration::from_secs(10)))
                .1
                .len(),
            1
        );
    }

    #[test]
    fn oversample_1_hands_out_one_round_and_refills_filtered_prompts() {
        let t = Instant::now();
        let config = SchedulerConfig {
            oversample: 1.0,
            ..config(4)
        };
        let mut s = Scheduler::new(prompts(50), config, None).unwrap();
        let (a, b) = (s.register("a", t), s.register("b", t));
        // A round of B = 4 prompts, split between the two actors.
        let (_, for_a) = items(s.pull(&a, 8, t));
        assert_eq!(for_a.len(), 2, "half a round each");
        let (_, for_b) = items(s.pull(&b, 8, t));
        assert_eq!(for_b.len(), 2);
        assert!(is_busy(s.pull(&a, 8, t)), "nothing beyond the round");
        // One group kept, one filtered out (all correct): the filtered prompt is replaced.
        assert_eq!(s.submit(group(&for_a[0], &a, 0, 2), t), Submitted::Kept);
        assert_eq!(s.submit(group(&for_a[1], &a, 0, 4), t), Submitted::Filtered);
        let (_, again) = items(s.pull(&a, 8, t));
        assert_eq!(again.len(), 1, "one kept + three out = a round");
        assert!(is_busy(s.pull(&b, 8, t)));
        for work in &for_b {
            assert_eq!(s.submit(group(work, &b, 0, 2), t), Submitted::Kept);
        }
        assert_eq!(s.submit(group(&again[0], &a, 0, 2), t), Submitted::Kept);
        let batch = s.take_batch().unwrap();
        assert_eq!(batch.groups.len(), 4);
        assert_eq!(batch.stats.surplus_requeued, 0, "nothing was sampled twice");
    }

    #[test]
    fn bounded_staleness_lets_actors_run_ahead() {
        let t = Instant::now();
        let config = SchedulerConfig {
            max_staleness: 1,
            ..config(2)
        };
        let mut s = Scheduler::new(prompts(30), config, None).unwrap();
        let actor = s.register("a", t);
        let (_, v0) = items(s.pull(&actor, 4, t));
        for work in &v0[..3] {
            assert_eq!(s.submit(group(work, &actor, 0, 2), t), Submitted::Kept);
        }
        let batch = s.take_batch().unwrap();
        assert_eq!(batch.groups.len(), 2);
        assert_eq!(
            batch.stats.surplus_requeued, 0,
            "the surplus stays buffered"
        );
        let status = s.status(t);
        assert_eq!((status.groups_buffered, status.in_flight), (1, 1));
        // Training: work is still handed out, for the current version.
        let (version, during) = items(s.pull(&actor, 2, t));
        assert_eq!(version, 0);
        s.publish(1);
        // One version old: accepted.
        assert_eq!(s.submit(group(&v0[3], &actor, 0, 2), t), Submitted::Kept);
        assert_eq!(
            s.submit(group(&during[0], &actor, 0, 2), t),
            Submitted::Kept
        );
        let batch = s.take_batch().unwrap();
        assert_eq!(batch.policy_version, 1);
        assert!(batch.groups.iter().all(|g| g.policy_version == 0));
        // Version 0 work and groups are too old once version 2 is out: cancelled at the
        // batch, so the late group is stale.
        assert_eq!(s.status(t).counters.cancelled, 1);
        assert_eq!(
            s.submit(group(&during[1], &actor, 0, 2), t),
            Submitted::Stale
        );
        let (version, v1) = items(s.pull(&actor, 1, t));
        assert_eq!(version, 1);
        assert_eq!(v1[0].prompt_index, during[0].prompt_index, "surplus first");
        assert_eq!(s.submit(group(&v1[0], &actor, 1, 2), t), Submitted::Kept);
        s.publish(2);
        s.publish(3);
        assert_eq!(
            s.status(t).groups_buffered,
            0,
            "a version 1 group ages out at 3"
        );
        assert_eq!(s.status(t).counters.stale, 2);
        assert_eq!(
            s.state().surplus_prompts,
            [during[1].prompt_index, v1[0].prompt_index],
            "the cancelled work, then the aged-out group"
        );
    }

    #[test]
    fn truncated_groups_are_dropped_when_asked() {
        let t = Instant::now();
        let mut config = config(4);
        config.filter.drop_truncated = true;
        let mut s = Scheduler::new(prompts(10), config, None).unwrap();
        let actor = s.register("a", t);
        let (_, works) = items(s.pull(&actor, 2, t));
        let mut truncated = group(&works[0], &actor, 0, 2);
        truncated.scored.responses[3].truncated = true;
        assert_eq!(s.submit(truncated, t), Submitted::Filtered);
        assert_eq!(s.submit(group(&works[1], &actor, 0, 2), t), Submitted::Kept);
        assert_eq!(s.status(t).filter_pass_rate, 0.5);
    }

    #[test]
    fn invalid_configs_and_data_are_refused() {
        let bad = [
            SchedulerConfig {
                batch_groups: 0,
                ..config(1)
            },
            SchedulerConfig { k: 1, ..config(1) },
            SchedulerConfig {
                lease: Duration::ZERO,
                ..config(1)
            },
            SchedulerConfig {
                vocab_size: 0,
                ..config(1)
            },
            SchedulerConfig {
                max_response_tokens: 0,
                ..config(1)
            },
        ];
        for config in bad {
            assert!(Scheduler::new(prompts(3), config, None).is_err());
        }
        assert!(Scheduler::new(Vec::new(), config(1), None).is_err());
        let mut empty = prompts(3);
        empty[1].prompt_ids.clear();
        assert!(Scheduler::new(empty, config(1), None).is_err());
    }
}

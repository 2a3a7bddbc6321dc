//! A generation in progress that requests can join between decode steps (continuous
//! batching). At most [`Llama::decode_rows`] requests decode at once; the others wait in
//! arrival order. When running requests finish, the next waiting ones are prefilled, draw
//! their first token from their own prefill, and their cache rows are joined to the running
//! batch's (`KvCache::join`). [`super::generate::generate`] runs one call's requests
//! through a decoder; the model worker keeps one running across jobs, so a job that arrives
//! while another decodes fills the rows the first one's finished requests left.
//!
//! Which requests share a step never changes a request's tokens: each samples from its own
//! generator, and on the CPU's fused kernels its log-probabilities are the same bits
//! whatever shares its batch (elsewhere, the same within rounding).

use std::collections::VecDeque;

use tch::{Device, Kind, Tensor};

use super::ModelError;
use super::generate::{
    Finish, GenerateRequest, Generation, StepLogits, check_request, prefill, shared_prefix_len,
};
use super::llama::{KvCache, Llama};
use super::sampling::Sampler;

/// One request's state inside a [`Decoder`].
struct Slot {
    prompt: Vec<u32>,
    /// Prefix tokens its group computes once ([`shared_prefix_len`] over the requests added
    /// together with it), so a request that starts later, even alone, is served the same
    /// prefix from memory.
    shared: usize,
    /// Which [`Decoder::add`] call brought it: one prefill takes requests of one group.
    group: usize,
    sampler: Sampler,
    output: Generation,
    next_pos: i64,
}

/// A generation that requests join between steps; see the module documentation.
pub struct Decoder<'a> {
    model: &'a Llama,
    eos: &'a [u32],
    rows: usize,
    slots: Vec<Option<Slot>>,
    groups: usize,
    waiting: VecDeque<usize>,
    /// Requests decoding now, in cache-row order, with the tokens to feed them next.
    active: Vec<usize>,
    last_tokens: Vec<i64>,
    /// The running requests' cache (`None` while none runs).
    cache: Option<KvCache>,
}

impl<'a> Decoder<'a> {
    /// An idle decoder over `model`, whose turns end at any of `eos`; it decodes at most
    /// [`Llama::decode_rows`] requests at once.
    pub fn new(model: &'a Llama, eos: &'a [u32]) -> Decoder<'a> {
        Decoder {
            model,
            eos,
            rows: model.decode_rows().unwrap_or(usize::MAX).max(1),
            slots: Vec::new(),
            groups: 0,
            waiting: VecDeque::new(),
            active: Vec::new(),
            last_tokens: Vec::new(),
            cache: None,
        }
    }

    /// Queues `requests` (checked first: a bad one queues nothing) and returns the ids
    /// [`Decoder::step`] will hand their generations back under, consecutive from the first.
    pub fn add(&mut self, requests: &[GenerateRequest]) -> Result<usize, ModelError> {
        for (i, r) in requests.iter().enumerate() {
            check_request(self.model, r, i)?;
        }
        let prompts: Vec<&[u32]> = requests.iter().map(|r| r.prompt.as_slice()).collect();
        let shared = shared_prefix_len(self.model, &prompts);
        let first = self.slots.len();
        let group = self.groups;
        self.groups += 1;
        for r in requests {
            self.waiting.push_back(self.slots.len());
            self.slots.push(Some(Slot {
                prompt: r.prompt.clone(),
                shared,
                group,
                sampler: Sampler::new(r.params.clone()),
                output: Generation {
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    finish: Finish::Length,
                },
                next_pos: r.prompt.len() as i64,
            }));
        }
        Ok(first)
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// Whether a request added now would start at the next step: nothing waits and a row
    /// is free.
    pub fn has_room(&self) -> bool {
        self.waiting.is_empty() && self.active.len() < self.rows
    }

    /// Starts waiting requests in free rows, then runs one decode step. Returns the
    /// requests that finished, by id, with their generations.
    pub fn step(&mut self) -> Result<Vec<(usize, Generation)>, ModelError> {
        let _guard = tch::no_grad_guard();
        let mut finished = Vec::new();
        self.refill(&mut finished)?;
        if self.active.is_empty() {
            return Ok(finished);
        }
        let step = self.decode_step()?;
        let active = std::mem::take(&mut self.active);
        let (still, keep, tokens) = self.draw(&step, &active, &mut finished);
        let device = self.device();
        self.active = still;
        if self.active.is_empty() {
            self.cache = None;
        } else if self.active.len() < active.len() {
            let extra = self
                .active
                .iter()
                .map(|&id| self.remaining(id))
                .max()
                .unwrap_or(1);
            if let Some(cache) = self.cache.take() {
                let rows = Tensor::from_slice(&keep).to_device(device);
                self.cache = Some(cache.compact(&rows, extra)?);
            }
        }
        self.last_tokens = tokens;
        Ok(finished)
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    fn slot(&self, id: usize) -> &Slot {
        self.slots[id]
            .as_ref()
            .expect("a running request has a slot")
    }

    fn slot_mut(&mut self, id: usize) -> &mut Slot {
        self.slots[id]
            .as_mut()
            .expect("a running request has a slot")
    }

    /// How many more tokens request `id` may be fed: the room its cache row needs.
    fn remaining(&self, id: usize) -> i64 {
        let s = self.slot(id);
        (s.sampler.params().max_new_tokens - s.output.tokens.len()) as i64
    }

    /// Prefills waiting requests into free rows, a group at a time, and joins their cache
    /// rows to the running ones.
    fn refill(&mut self, finished: &mut Vec<(usize, Generation)>) -> Result<(), ModelError> {
        while self.active.len() < self.rows && !self.waiting.is_empty() {
            let room = self.rows - self.active.len();
            let group = self.slot(self.waiting[0]).group;
            let mut cohort = Vec::new();
            while cohort.len() < room
                && self
                    .waiting
                    .front()
                    .is_some_and(|&id| self.slot(id).group == group)
            {
                cohort.extend(self.waiting.pop_front());
            }
            let (joined, tokens, rows) = self.start(&cohort, finished)?;
            let Some(rows) = rows else {
                continue;
            };
            let extra = self
                .active
                .iter()
                .chain(&joined)
                .map(|&id| self.remaining(id))
                .max()
                .unwrap_or(1);
            self.cache = Some(match self.cache.take() {
                Some(running) => running.join(&rows, extra)?,
                // Nothing was running: the newcomers' own cache has room for them.
                None => rows,
            });
            self.active.extend(joined);
            self.last_tokens.extend(tokens);
        }
        Ok(())
    }

    /// Prefills `cohort` and draws each one's first token. Returns the requests that go on,
    /// the tokens to feed them, and their cache rows.
    #[allow(clippy::type_complexity)]
    fn start(
        &mut self,
        cohort: &[usize],
        finished: &mut Vec<(usize, Generation)>,
    ) -> Result<(Vec<usize>, Vec<i64>, Option<KvCache>), ModelError> {
        let prompts: Vec<&[u32]> = cohort
            .iter()
            .map(|&id| self.slot(id).prompt.as_slice())
            .collect();
        let max_new = cohort
            .iter()
            .map(|&id| self.slot(id).sampler.params().max_new_tokens)
            .max()
            .unwrap_or(0) as i64;
        let shared = self.slot(cohort[0]).shared;
        let (last, mut cache, _) = prefill(self.model, &prompts, max_new.max(1), shared)?;
        let samplers: Vec<&Sampler> = cohort.iter().map(|&id| &self.slot(id).sampler).collect();
        let step = StepLogits::new(
            &self.model.logits_raw(&last),
            &samplers,
            self.model.fused_kernels(),
        )?;
        let (still, keep, tokens) = self.draw(&step, cohort, finished);
        if still.is_empty() {
            return Ok((still, tokens, None));
        }
        if still.len() < cohort.len() {
            cache.retain_rows(&Tensor::from_slice(&keep).to_device(self.device()));
        }
        Ok((still, tokens, Some(cache)))
    }

    /// Draws the next token of every request in `rows` (row `i` of `step` is `rows[i]`).
    /// Finished requests go to `finished`; returns those that go on, their rows in `step`,
    /// and the tokens to feed them.
    fn draw(
        &mut self,
        step: &StepLogits,
        rows: &[usize],
        finished: &mut Vec<(usize, Generation)>,
    ) -> (Vec<usize>, Vec<i64>, Vec<i64>) {
        let vocab = self.model.config().vocab_size;
        let mut still = Vec::with_capacity(rows.len());
        let mut keep_rows = Vec::with_capacity(rows.len());
        let mut last_tokens = Vec::with_capacity(rows.len());
        for (row, &id) in rows.iter().enumerate() {
            let eos = self.eos;
            let slot = self.slot_mut(id);
            let params = slot.sampler.params();
            let done = if params.max_new_tokens == 0 {
                true
            } else {
                let draw = step.draw(&mut slot.sampler, row, vocab);
                slot.output.tokens.push(draw.token);
                slot.output.logprobs.push(draw.logprob);
                let params = slot.sampler.params();
                if eos.contains(&draw.token) || params.stop.contains(&draw.token) {
                    slot.output.finish = Finish::Stop;
                    true
                } else if slot.output.tokens.len() >= params.max_new_tokens {
                    slot.output.finish = Finish::Length;
                    true
                } else {
                    last_tokens.push(draw.token as i64);
                    false
                }
            };
            if done {
                if let Some(slot) = self.slots[id].take() {
                    finished.push((id, slot.output));
                }
            } else {
                still.push(id);
                keep_rows.push(row as i64);
            }
        }
        (still, keep_rows, last_tokens)
    }

    /// Feeds each running request its last token and returns the next step's logits.
    fn decode_step(&mut self) -> Result<StepLogits, ModelError> {
        let started = std::time::Instant::now();
        let b = self.active.len() as i64;
        let device = self.device();
        let mut positions = Vec::with_capacity(self.active.len());
        for i in 0..self.active.len() {
            let id = self.active[i];
            let slot = self.slot_mut(id);
            positions.push(slot.next_pos);
            slot.next_pos += 1;
        }
        let tokens = Tensor::from_slice(&self.last_tokens)
            .view([b, 1])
            .to_device(device);
        let positions = Tensor::from_slice(&positions)
            .view([b, 1])
            .to_device(device);
        let valid = Tensor::ones([b, 1], (Kind::Bool, device));
        let Some(cache) = self.cache.as_mut() else {
            return Err(ModelError::InvalidRequest(
                "decode step without a cache".into(),
            ));
        };
        let hidden = self
            .model
            .forward(&tokens, &positions, &valid, Some(cache))?;
        let samplers: Vec<&Sampler> = self
            .active
            .iter()
            .map(|&id| &self.slot(id).sampler)
            .collect();
        let step = StepLogits::new(
            &self.model.logits_raw(&hidden.select(1, 0)),
            &samplers,
            self.model.fused_kernels(),
        );
        self.model
            .count_decode_step(self.active.len(), started.elapsed());
        step
    }
}

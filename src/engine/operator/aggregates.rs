//! Differential-dataflow aggregates over every operator's own outputs (counts per stage
//! and kind), for the live view and the run summary.

use super::*;

/// Live aggregates with differential dataflow: the count of records per (stage, label), where
/// the label is the principle for critiques and revisions, the purpose for samples and the
/// kind otherwise. The counts update incrementally as epochs stream through; the latest value
/// of each is kept for the run summary.
pub(super) fn aggregates<'s>(stream: Stream<'s, u64, Vec<Rec>>, shared: &Shared) {
    use differential_dataflow::AsCollection;
    let shared = shared.clone();
    let updates = stream.unary(Pipeline, "ToUpdates", |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                let mut session = output.session(&cap);
                for container in data {
                    for rec in container.iter() {
                        let label = match &rec.payload {
                            Payload::Critique(c) => c.principle.clone(),
                            Payload::Revision(r) => r.principle.clone(),
                            Payload::Sample(s) => {
                                format!("{:?}", s.conversation.purpose).to_lowercase()
                            }
                            other => other.kind().to_string(),
                        };
                        session.give(((rec.stage.clone(), label), *cap.time(), 1isize));
                    }
                }
            });
        }
    });
    updates
        .as_collection()
        .count()
        .inspect(move |(((stage, label), count), _time, diff)| {
            if *diff > 0 {
                let mut state = shared.0.borrow_mut();
                let entry = state
                    .aggregates
                    .entry((stage.clone(), label.clone()))
                    .or_insert(0);
                *entry = (*entry).max(*count as i64);
            }
        });
}

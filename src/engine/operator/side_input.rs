//! Reading a second stream beside an operator's main input (a gate's checkpoint, the
//! records coming back around a feedback loop).

use super::*;

pub(super) type RecInput = timely::dataflow::operators::generic::InputHandleCore<
    u64,
    Vec<Rec>,
    <Pipeline as timely::dataflow::channels::pact::ParallelizationContract<u64, Vec<Rec>>>::Puller,
>;
pub(super) type RecOutput<'a> = timely::dataflow::operators::generic::OutputBuilderSession<
    'a,
    u64,
    timely::container::CapacityContainerBuilder<Vec<Rec>>,
>;

/// Like timely's `binary_frontier`, except that the second input is a *side input*: it is not
/// connected to the output in progress tracking (outputs are made only under capabilities of
/// the first input). A feedback loop into the side input therefore forms no cycle of
/// capabilities: an operator holding a capability downstream would otherwise see its own
/// capability come back around the loop, one epoch later, and chase it forever.
pub(super) fn with_side_input<'s, B, L>(
    stream: Stream<'s, u64, Vec<Rec>>,
    side: Stream<'s, u64, Vec<Rec>>,
    name: &str,
    constructor: B,
) -> Stream<'s, u64, Vec<Rec>>
where
    B: FnOnce(Capability<u64>, timely::dataflow::operators::generic::OperatorInfo) -> L,
    L: FnMut(
            (
                &mut RecInput,
                &timely::progress::frontier::MutableAntichain<u64>,
            ),
            (
                &mut RecInput,
                &timely::progress::frontier::MutableAntichain<u64>,
            ),
            &mut RecOutput<'_>,
        ) + 'static,
{
    use timely::dataflow::operators::generic::OutputBuilder;
    use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
    let mut builder = OperatorBuilder::new(name.to_owned(), stream.scope());
    let info = builder.operator_info();
    let mut main = builder.new_input(stream, Pipeline);
    // The output is connected to the inputs that exist when it is made: only `main`.
    let (output, out_stream) = builder.new_output();
    let mut side_in = builder.new_input_connection(side, Pipeline, []);
    let mut output: OutputBuilder<u64, timely::container::CapacityContainerBuilder<Vec<Rec>>> =
        OutputBuilder::from(output);
    builder.build(move |mut capabilities| {
        let mut logic = capabilities.pop().map(|cap| constructor(cap, info));
        move |frontiers| {
            let mut session = output.activate();
            if let Some(logic) = logic.as_mut() {
                logic(
                    (&mut main, &frontiers[0]),
                    (&mut side_in, &frontiers[1]),
                    &mut session,
                );
            }
        }
    });
    out_stream
}

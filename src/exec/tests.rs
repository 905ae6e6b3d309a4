use super::*;

#[test]
fn split_disjoint_both_orders() {
    let mut buf = [0u8, 1, 2, 3, 4, 5];
    let (a, b) = split_disjoint(&mut buf, 0..2, 3..6);
    assert_eq!(a, &[0, 1]);
    b[0] = 9;
    assert_eq!(buf[3], 9);
    let (a, b) = split_disjoint(&mut buf, 4..6, 0..1);
    assert_eq!(a, &[4, 5]);
    b[0] = 7;
    assert_eq!(buf[0], 7);
}

#[test]
fn local_steps_copy_and_combine_in_order() {
    use crate::dtype::Order;
    use crate::plan::Plan;
    // Buffer [a | b | c]: c = a, then b = b - ... with Sum: b = c + b (c on the left).
    let mut plan = Plan::empty(0, 1, 3);
    plan.steps.push(Step::Local { src: 0..1, dst: 2..3, action: Action::Copy });
    plan.steps.push(Step::Local { src: 2..3, dst: 1..2, action: Action::Reduce(Order::IncomingLeft) });
    assert!(plan.validate().is_ok());
    let sim = crate::sim::Simulation::new(DType::I32, ReduceOp::Sum);
    let buf: Vec<u8> = bytemuck::cast_slice(&[5i32, 7, 0]).to_vec();
    match &sim.run(&[plan], vec![buf])[0] {
        crate::sim::Outcome::Done(out) => assert_eq!(bytemuck::cast_slice::<u8, i32>(out), &[5, 12, 5]),
        other => panic!("unexpected outcome {other:?}"),
    }
    let mut bad = Plan::empty(0, 1, 3);
    bad.steps.push(Step::Local { src: 0..2, dst: 1..3, action: Action::Copy });
    assert!(bad.validate().is_err(), "overlapping local ranges are rejected");
}

/// A link that keeps the payloads of the frames it carries (alive, so that their
/// addresses are never reused and identify them).
struct Recorder {
    inner: Arc<dyn Link>,
    sent: Arc<std::sync::Mutex<Vec<Bytes>>>,
    received: Arc<std::sync::Mutex<Vec<Bytes>>>,
}

#[async_trait::async_trait]
impl Link for Recorder {
    async fn send(&self, frame: Frame) -> std::result::Result<(), LinkError> {
        self.sent.lock().unwrap().push(frame.payload.clone());
        self.inner.send(frame).await
    }
    async fn recv(&self) -> std::result::Result<Frame, LinkError> {
        let frame = self.inner.recv().await?;
        self.received.lock().unwrap().push(frame.payload.clone());
        Ok(frame)
    }
    fn close(&self) {
        self.inner.close()
    }
}

/// The forwarding rule itself: in the ring's all-gather, every frame a rank sends
/// after its first all-gather step is a frame it received (the same bytes, not a
/// re-encoding); every other frame it sends is a fresh encoding.
#[test]
fn quantized_ring_forwards_received_frames_unchanged() {
    use crate::quant::{Codec, Quantization};
    let (n, seg, chunk_elems) = (4usize, 40usize, 16usize);
    let len = n * seg;
    let chunks = seg.div_ceil(chunk_elems);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    type Log = Arc<std::sync::Mutex<Vec<Bytes>>>;
    let records: Vec<(Log, Log)> = (0..n).map(|_| (Log::default(), Log::default())).collect();
    let outs = rt.block_on(async {
        let abort = AbortSignal::new();
        let mut tasks = Vec::new();
        for (rank, links) in crate::transport::mem::mesh(n, 64).into_iter().enumerate() {
            let (sent, received) = records[rank].clone();
            let links: Vec<Option<Arc<dyn Link>>> = links
                .into_iter()
                .map(|l| {
                    l.map(|inner| {
                        Arc::new(Recorder { inner, sent: sent.clone(), received: received.clone() }) as Arc<dyn Link>
                    })
                })
                .collect();
            let abort = abort.clone();
            tasks.push(tokio::spawn(async move {
                let plan = crate::plan::allreduce::ring(rank, n, len);
                let call = Call {
                    plan: &plan,
                    dtype: DType::F32,
                    op: ReduceOp::Sum,
                    epoch: 0,
                    seq: 1,
                    fingerprint: 0,
                    chunk_bytes: chunk_elems * 4,
                    custom: None,
                    codec: Some(Codec::new(Quantization::U8)),
                    delivery: Default::default(),
                };
                let x: Vec<f32> = (0..len).map(|i| ((i * (rank + 3)) % 17) as f32 * 0.37 - 2.0).collect();
                let mut buf: Vec<u8> = bytemuck::cast_slice(&x).to_vec();
                execute(&call, &mut buf, &links, &abort, 0..plan.steps.len()).await.map(|()| buf)
            }));
        }
        let mut outs = Vec::new();
        for t in tasks {
            outs.push(t.await.unwrap().unwrap());
        }
        outs
    });
    assert!(outs.iter().all(|o| o == &outs[0]), "identical bytes");
    for (rank, (sent, received)) in records.iter().enumerate() {
        let (sent, received) = (sent.lock().unwrap(), received.lock().unwrap());
        assert_eq!(sent.len(), 2 * (n - 1) * chunks, "rank {rank}");
        let fresh = n * chunks; // n - 1 reduce-scatter steps and the first all-gather step
        for (i, p) in sent.iter().enumerate() {
            let forwarded = received.iter().any(|r| r.as_ptr() == p.as_ptr());
            assert_eq!(forwarded, i >= fresh, "rank {rank}, frame {i}: forwarded iff after the owner's step");
        }
    }
}

#[test]
fn abort_signal_keeps_first_reason() {
    let s = AbortSignal::new();
    assert!(s.fired().is_none());
    s.fire(Error::Aborted { reason: "one".into() });
    s.fire(Error::Aborted { reason: "two".into() });
    assert_eq!(s.fired(), Some(Error::Aborted { reason: "one".into() }));
}

/// A call of a one-step transfer plan over `links`.
fn transfer_call(plan: &Plan, delivery: Delivery) -> Call<'_> {
    Call {
        plan,
        dtype: DType::U8,
        op: ReduceOp::Sum,
        epoch: 1,
        seq: 1,
        fingerprint: 7,
        chunk_bytes: 4,
        custom: None,
        codec: None,
        delivery,
    }
}

/// A sender that dies after two of its three chunks: with delivery on success the
/// receiver's buffer is untouched; in place it holds the two chunks (so the first
/// assertion is not vacuous).
#[test]
fn delivery_on_success_leaves_the_buffer_untouched_when_the_sender_dies() {
    use crate::plan::transfer;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for (delivery, untouched) in [(Delivery::OnSuccess, true), (Delivery::InPlace, false)] {
        let (a, b) = crate::transport::mem::pair(8);
        let (a, b): (Arc<dyn Link>, Arc<dyn Link>) = (Arc::new(a), Arc::new(b));
        let data: Vec<u8> = (1..=12).collect();
        let mut out = vec![0u8; 12];
        rt.block_on(async {
            // Rank 0 sends the first 8 bytes of a 12-byte message, then its link closes.
            let partial = transfer::send(0, 2, 8, 1);
            let links: Vec<Option<Arc<dyn Link>>> = vec![None, Some(a.clone())];
            let call = transfer_call(&partial, Delivery::InPlace);
            execute_send(&call, &data[..8], &links, &AbortSignal::new()).await.unwrap();
            a.close();
            let full = transfer::recv(1, 2, 12, 0);
            let links: Vec<Option<Arc<dyn Link>>> = vec![Some(b), None];
            let e = execute(&transfer_call(&full, delivery), &mut out, &links, &AbortSignal::new(), 0..1).await;
            assert!(matches!(e, Err(Error::PeerLost { rank: 0, .. })), "{e:?}");
        });
        if untouched {
            assert_eq!(out, vec![0; 12], "{delivery:?}");
        } else {
            assert_eq!(out[..8], data[..8], "{delivery:?}");
        }
    }
}

#[test]
fn read_only_and_held_calls_refuse_plans_they_cannot_honour() {
    use crate::plan::transfer;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let links: Vec<Option<Arc<dyn Link>>> = vec![None, None];
    // A receive plan cannot run on a read-only buffer.
    let recv = transfer::recv(0, 2, 4, 1);
    let e = rt.block_on(execute_send(&transfer_call(&recv, Delivery::InPlace), &[0; 4], &links, &AbortSignal::new()));
    assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");
    // Holding frames until success is for receive-only copies: a reduce reads them.
    let mut reduce = Plan::empty(0, 2, 4);
    reduce.steps.push(Step::recv(1, 0..4, Action::Reduce(crate::dtype::Order::IncomingLeft)));
    let e = rt.block_on(execute(
        &transfer_call(&reduce, Delivery::OnSuccess),
        &mut [0; 4],
        &links,
        &AbortSignal::new(),
        0..1,
    ));
    assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");
}

/// The executor saves every byte it overwrites before the write: a ring all-reduce that
/// fails in its all-gather, after reduce-scatter steps and all-gather copies wrote parts
/// of the buffers, is put back exactly by `Undo::restore`, for raw and coded wires and
/// for an average (whose final division writes the whole buffer).
#[test]
fn a_call_that_fails_after_writing_is_put_back_by_what_it_saved() {
    use crate::quant::{Codec, Quantization};
    let (n, len) = (3usize, 3 * 40);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    for (codec, op) in
        [(None, ReduceOp::Sum), (Some(Codec::new(Quantization::U8)), ReduceOp::Sum), (None, ReduceOp::Avg)]
    {
        let results = rt.block_on(async {
            let mut tasks = Vec::new();
            for (rank, links) in crate::transport::mem::mesh(n, 64).into_iter().enumerate() {
                tasks.push(tokio::spawn(async move {
                    let plan = crate::plan::allreduce::ring(rank, n, len);
                    let call = Call {
                        plan: &plan,
                        dtype: DType::F32,
                        op,
                        epoch: 0,
                        seq: 1,
                        fingerprint: 0,
                        chunk_bytes: 16 * 4,
                        custom: None,
                        codec,
                        delivery: Default::default(),
                    };
                    let x: Vec<f32> = (0..len).map(|i| ((i * (rank + 3)) % 17) as f32 * 0.37 - 2.0).collect();
                    let original: Vec<u8> = bytemuck::cast_slice(&x).to_vec();
                    let mut buf = original.clone();
                    let mut undo = Undo::default();
                    undo.begin(buf.len());
                    // Rank 2 runs the reduce-scatter and the first all-gather step, then
                    // leaves: the others fail in the all-gather with written buffers.
                    let steps = if rank == 2 { 0..plan.steps.len() - 1 } else { 0..plan.steps.len() };
                    let result = execute_saving(&call, &mut buf, &links, &AbortSignal::new(), steps, &mut undo).await;
                    for l in links.iter().flatten() {
                        l.close();
                    }
                    let written = buf != original;
                    // A rank that completed is put back too, as when the eager
                    // conclusion fails after the plan ran (the average divided too).
                    undo.restore(&mut buf);
                    (rank, result.is_err(), written, undo.saved_bytes(), buf == original)
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        // The rank that receives rank 2's last all-gather step fails.
        assert!(results.iter().any(|r| r.0 != 2 && r.1), "{codec:?} {op:?}: a rank must fail");
        for (rank, _, written, saved, restored) in results {
            assert!(written && saved > 0, "{codec:?} {op:?}: rank {rank} wrote before failing (not vacuous)");
            assert!(restored, "{codec:?} {op:?}: rank {rank} put back exactly");
        }
    }
}

/// Payloads lent from a shared-memory ring keep the ring's room until dropped: a
/// receiver that holds every frame until the message is whole (delivery on success)
/// copies them first (as it does the coded frames an all-gather keeps to forward), or
/// a message larger than the ring would stall its sender for ever.
#[test]
fn held_frames_from_a_lending_link_do_not_stall_the_sender() {
    use crate::plan::transfer;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (a, b) = crate::transport::shm::link::heap_pair(256 << 10, 1 << 20);
    let (a, b): (Arc<dyn Link>, Arc<dyn Link>) = (Arc::new(a), Arc::new(b));
    assert!(b.lends_frames());
    let len = 2 << 20; // eight times the ring
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut out = vec![0u8; len];
    let call = |plan, delivery| Call { chunk_bytes: 96 << 10, ..transfer_call(plan, delivery) };
    let (send, recv) = (transfer::send(0, 2, len, 1), transfer::recv(1, 2, len, 0));
    let result = rt.block_on(async {
        let sending = async {
            let links: Vec<Option<Arc<dyn Link>>> = vec![None, Some(a.clone())];
            execute_send(&call(&send, Delivery::InPlace), &data, &links, &AbortSignal::new()).await
        };
        let receiving = async {
            let links: Vec<Option<Arc<dyn Link>>> = vec![Some(b.clone()), None];
            execute(&call(&recv, Delivery::OnSuccess), &mut out, &links, &AbortSignal::new(), 0..1).await
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), async { tokio::try_join!(sending, receiving) }).await
    });
    assert!(matches!(result, Ok(Ok(_))), "the transfer completes: {result:?}");
    assert_eq!(out, data);
}

"""Throughput, compute and memory of Segmenters, with and without token sharing.

What is timed is the whole inference of a batch already on the device: policy net, encoder,
decoder, unsharing, upsampling to full resolution and argmax (:meth:`Segmenter.predict`).
Sharing on (K) and off (K = 0, the same weights: exactly the plain Segmenter) are timed in
turns within one process, so that their ratio is fair on a shared, noisy machine.

Two commands share this machinery: ``cts throughput`` (the paper's table, random weights)
and the pipeline's ``benchmark`` and ``sweep`` stages (the trained model, validation images).

- :mod:`.devices`: device names, precisions, the runtime recorded with a measurement;
- :mod:`.compilation`: compile modes, the compiled ``predict`` and policy net;
- :mod:`.cost`: multiply-accumulates and tokens of one forward;
- :mod:`.memory`: peak memory, out-of-memory errors and the largest batch that fits;
- :mod:`.timing`: K and 0 (and the policy net alone) timed in turns;
- :mod:`.inputs`: the batches timed (random images, validation images);
- :mod:`.measure`: one model with and without sharing, or over a range of K;
- :mod:`.rows`: the rows of the table (the paper's, any backbone) and policy-net settings;
- :mod:`.table`: the table measured, written as JSON and markdown;
- :mod:`.sweep`: the K of the accuracy-vs-speed sweep and its picture.
"""

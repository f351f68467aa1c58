"""Every in-place change to another library's objects, one per module, each naming what it changes and why.

``fused_head`` (TRL's fused LM head on models without a backbone module), ``vision_attention`` (Qwen-VL towers'
segment attention as one batched call), ``compile_layers`` (torch.compile per decoder layer and vision block),
``fsdp_cpu`` (accelerate's FSDP plugin kept on CPU processes, which accelerate turns into plain data parallel), and
transformers' bugs and gaps (each module names the versions): ``input_grad_hooks`` (the input-embedding hook,
added again each time checkpointing is switched on), ``paligemma_labels`` (PaliGemma's labels of unpadded rows,
which TRL cannot stack), ``deferred_stop`` (the decode loop, which on CUDA waits for the device after every
token), ``packed_gqa`` (the compiled decode step, which copies grouped key/value heads once per query head), and
``shared_prefill`` (``generate``, which prefills each prompt once per sequence it samples from it).
"""

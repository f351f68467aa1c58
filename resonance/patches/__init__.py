"""Every in-place change to another library's objects, one per module, each naming what it changes and why.

``fused_head`` (TRL's fused LM head on models without a backbone module), ``vision_attention`` (Qwen-VL towers'
segment attention as one batched call), ``compile_layers`` (torch.compile per decoder layer and vision block),
``fsdp_cpu`` (accelerate's FSDP plugin kept on CPU processes, which accelerate turns into plain data parallel), and
``llama4_outputs`` (transformers 5.24's Llama 4 forward, which reads a field its language model does not return),
``input_grad_hooks`` (transformers 5.24's input-embedding hook, added again each time checkpointing is switched on),
``paligemma_labels`` (transformers 5.24's PaliGemma processor, which fails on unpadded rows of two lengths),
``deferred_stop`` (transformers 5.24's decode loop, which on CUDA waits for the device after every token), and
``packed_gqa`` (transformers 5.24's compiled decode step, which copies grouped key/value heads once per query head).
"""

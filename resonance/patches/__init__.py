"""Every in-place change to another library's objects, one per module, each naming what it changes and why.

``fused_head`` (TRL's fused LM head on models without a backbone module), ``vision_attention`` (Qwen-VL towers'
segment attention as one batched call), ``compile_layers`` (torch.compile per decoder layer and vision block), and
``fsdp_cpu`` (accelerate's FSDP plugin kept on CPU processes, which accelerate turns into plain data parallel).
"""

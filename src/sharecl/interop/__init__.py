"""Interoperability with PEFT: read LoRA adapter directories, write tasks as LoRA adapters."""

from sharecl.interop.peft import AdapterError, export_task, read_lora_adapter

__all__ = ["AdapterError", "export_task", "read_lora_adapter"]

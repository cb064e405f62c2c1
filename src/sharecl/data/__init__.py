"""Tasks, task streams, packaged real datasets and loaders for users' own files."""

from sharecl.data.files import load_task_file
from sharecl.data.streams import STREAMS, get_stream
from sharecl.data.tasks import Stream, Task, split_task

__all__ = ["Task", "Stream", "split_task", "load_task_file", "STREAMS", "get_stream"]

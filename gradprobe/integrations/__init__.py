"""Entry points into the training stacks people fine-tune with: LLaMA-Factory and ms-swift.

Each runs the stack's own training function with an :class:`~gradprobe.train.callback.AlignmentCallback`
bound to the Trainer that the stack builds (the callback binds itself when it is passed to the
Trainer's constructor), so its scalars reach every ``report_to`` logger and ``trainer_state.json``'s log
history, and builds the image probe batches through the stack's own data pipeline (template, tokenizer,
processor, collator), so that probes are formatted exactly like the training batches. The stacks are
imported only when these functions are called; they are not dependencies of gradprobe.
"""

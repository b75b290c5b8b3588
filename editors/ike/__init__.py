"""`ike`: In-Context Knowledge Editing (Zheng et al., EMNLP 2023, "Can We Edit Factual Knowledge
by In-Context Learning?"), and with k = 0 its zero-demonstration form (KnowEdit's ICE).

No weight changes: an edit is a context put in front of every prompt the model is given, k
demonstrations retrieved from the train split of the case's task followed by the new fact:

    New Fact: <train prompt> <train target>\\nPrompt: <a prompt> <its answer>\\n\\n   (x k)
    New Fact: <prompt> <target_new>\\nPrompt: <the probe prompt>

One module per part (docs/ike.md):

  * hparams.py:     the hyperparameters and their bounds;
  * retrievers.py:  similarity of texts (TF-IDF, the model's own embeddings; a registry);
  * demos.py:       copy / update / retain demonstrations of train cases, their selection and order;
  * context.py:     the context text, the memory of facts (sequential mode) and fitting the
                    context into the model's positions;
  * editor.py:      the editor (`prepare` records the retriever; train splits are indexed on first
                    use per task; `apply` returns a context handle; sequential state and reattach).
"""

from editors.ike.editor import IKE
from editors.ike.hparams import IkeHparams
from editors.ike.retrievers import RETRIEVERS, Retriever

__all__ = ["IKE", "IkeHparams", "RETRIEVERS", "Retriever"]

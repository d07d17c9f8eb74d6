"""The tiny test model: a random-weight Llama and a real BPE tokenizer, built offline.

Tests and fresh dev machines need a model without a download, so raygate makes
one: deterministic from a seed (byte-identical files for the same seed), small
enough to build in seconds, and shaped so that both transformers and vLLM load
it (vLLM's CPU attention needs ``head_dim >= 64``).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path

from serve_app.config import TINY_MODEL_NAME

__all__ = ["TINY_MODEL_NAME", "make_tiny_model", "ensure_tiny_model"]

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, "<|im_start|>", EOS_TOKEN]
VOCAB_SIZE = 1536

# ChatML. ``<|im_end|>`` is the eos token, so generation stops at the end of a turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SENTENCES = """\
You are a helpful assistant: the system sets the rules, the user asks, the assistant answers.
The quick brown fox jumps over the lazy dog.
A gateway routes each request to the model that should answer it.
Please write a short poem about the sea and the wind.
What is the capital of France? The capital of France is Paris.
How many tokens are in this sentence? Let me count them for you.
The weather is nice today, so we are going for a walk in the park.
Machine learning models learn patterns from data and make predictions.
Can you translate this text into French, please?
She reads a book every evening before going to sleep.
The server answered with an error, so the client tried again later.
Good morning! How are you doing today? I am fine, thank you.
Cats and dogs are the most common pets in many countries.
Water boils at one hundred degrees Celsius at sea level.
The train leaves at nine o'clock and arrives at noon.
Summarize the following article in three sentences.
He opened the window and the cold air filled the room.
Numbers like 1, 2, 3, 42 and 2048 appear in code and in text.
Le renard brun rapide saute par-dessus le chien paresseux.
Bonjour ! Comment allez-vous aujourd'hui ? Je vais bien, merci.
Quelle est la capitale de la France ? C'est Paris, bien sûr.
Il fait beau aujourd'hui, alors nous allons nous promener au parc.
Pouvez-vous traduire ce texte en anglais, s'il vous plaît ?
Elle lit un livre chaque soir avant de s'endormir.
Le serveur a répondu avec une erreur, donc le client a réessayé plus tard.
Les chats et les chiens sont les animaux préférés des enfants.
L'eau bout à cent degrés au niveau de la mer.
Le train part à neuf heures et arrive à midi.
Résumez l'article suivant en trois phrases courtes.
Il a ouvert la fenêtre et l'air froid a rempli la pièce.
Écrivez un petit poème sur la mer, le vent et les étoiles.
Les modèles apprennent des régularités à partir des données.
Nous avons mangé une crème brûlée délicieuse après le dîner.
Yesterday the children built a castle of sand on the beach.
Remember to save your work before you close the program.
The library opens at eight and closes at six on weekdays.
Mountains, forests and lakes make this country beautiful.
Hier, les enfants ont construit un château de sable sur la plage.
N'oubliez pas d'enregistrer votre travail avant de fermer le programme.
La bibliothèque ouvre à huit heures et ferme à dix-huit heures.
Les montagnes, les forêts et les lacs rendent ce pays magnifique.
"""

_SUBJECTS_EN = ["The teacher", "My friend", "A small robot", "Our team", "The old man", "Every student"]
_VERBS_EN = ["likes", "writes", "finds", "answers", "remembers", "explains"]
_OBJECTS_EN = ["the long letter", "a hard question", "the red apple", "every message", "the new model"]
_SUBJECTS_FR = ["Le professeur", "Mon amie", "Un petit robot", "Notre équipe", "Le vieil homme", "Chaque élève"]
_VERBS_FR = ["aime", "écrit", "trouve", "répond à", "se souvient de", "explique"]
_OBJECTS_FR = ["la longue lettre", "une question difficile", "la pomme rouge", "chaque message", "le modèle"]
_PLACES_EN = ["in the kitchen", "at school", "near the river", "during the meeting", "on Sunday morning"]
_PLACES_FR = ["dans la cuisine", "à l'école", "près de la rivière", "pendant la réunion", "dimanche matin"]


def _corpus() -> list[str]:
    """Return the training text: fixed sentences plus every subject-verb-object-place sentence."""
    lines = _SENTENCES.splitlines()
    for words in (
        (_SUBJECTS_EN, _VERBS_EN, _OBJECTS_EN, _PLACES_EN),
        (_SUBJECTS_FR, _VERBS_FR, _OBJECTS_FR, _PLACES_FR),
    ):
        lines += [f"{s} {v} {o} {p}." for s, v, o, p in itertools.product(*words)]
    return lines


def _save_tokenizer(path: Path) -> int:
    """Train a byte-level BPE on the corpus, save it as a transformers tokenizer; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    wrapped.save_pretrained(path)
    return len(wrapped)


def _save_model(path: Path, vocab_size: int, seed: int) -> None:
    """Save a random-weight Llama whose weights depend only on ``seed``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {token: SPECIAL_TOKENS.index(token) for token in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,  # tied random embeddings make greedy decoding repeat its input
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    # Fill every tensor from our own generator, in name order: the weights then depend
    # on the seed alone, not on transformers' init scheme or the global RNG.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN]
    )
    model.save_pretrained(path, safe_serialization=True)


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build the tiny model at ``path``, replacing what is there.

    The model is built in a temporary sibling dir and renamed into place, so a
    reader never sees half a model.

    Args:
        path: the model dir to create.
        seed: the weights' seed; the same seed gives byte-identical files.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        vocab_size = _save_tokenizer(tmp)
        _save_model(tmp, vocab_size, seed)
        # mkdtemp makes a private dir; the model is meant to be read by other users' workers.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Built tiny model at %s (vocab %s, seed %s)", path, vocab_size, seed)
    return path


def ensure_tiny_model(path: Path) -> Path:
    """Build the tiny model at ``path`` unless it is there; safe across processes.

    A file lock on ``<path>.lock`` lets one process build while the others wait,
    and the check is repeated once the lock is held.

    Args:
        path: the model dir.

    Returns:
        ``path``.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (path / "config.json").exists():
                make_tiny_model(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path

"""Real Keras models, small, built from their published code with random weights.

- keras.io "Text classification with Transformer": a `TransformerBlock` layer
  holding MultiHeadAttention and two LayerNormalization, a
  `TokenAndPositionEmbedding` layer.
- keras.io "Timeseries classification with a Transformer model": functional
  encoder blocks with attention dropout 0.25.
- keras.io "English-to-Spanish translation with a sequence-to-sequence
  Transformer": `PositionalEmbedding` (padding masks from token 0),
  `TransformerEncoder`, `TransformerDecoder` (causal self-attention and
  cross-attention), dict inputs.
- keras-hub `BertTextClassifier`, `GPT2CausalLM` (and their backbones), and
  keras-hub `TransformerEncoder`/`TransformerDecoder` in a functional model.

The keras.io layers are those of the examples (Keras 3 versions), registered
so that `.keras` files holding them load in another process that imports
this module.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

VOCAB = 64
SEQ = 12

# --- keras.io: Text classification with Transformer -------------------------


@keras.saving.register_keras_serializable(package="real_models")
class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.ff_dim, self.rate = embed_dim, num_heads, ff_dim, rate
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "rate": self.rate}


@keras.saving.register_keras_serializable(package="real_models")
class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.maxlen, self.vocab_size, self.embed_dim = maxlen, vocab_size, embed_dim
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions

    def get_config(self):
        return {**super().get_config(), "maxlen": self.maxlen, "vocab_size": self.vocab_size,
                "embed_dim": self.embed_dim}


def text_classifier(embed_dim=16, num_heads=2, ff_dim=32):
    inputs = layers.Input(shape=(SEQ,))
    x = TokenAndPositionEmbedding(SEQ, VOCAB, embed_dim)(inputs)
    x = TransformerBlock(embed_dim, num_heads, ff_dim)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def text_classifier_data(rng, n=32):
    return rng.integers(0, VOCAB, (n, SEQ)), rng.integers(0, 2, (n,))


# --- keras.io: English-to-Spanish translation with a seq2seq Transformer ----
# The Keras 3 version of the example, except that the causal mask is broadcast
# instead of tiled (`ops.tile` with a tensor of multiples fails in Keras 3.15's
# symbolic build on TensorFlow).


@keras.saving.register_keras_serializable(package="real_models")
class TransformerEncoder(layers.Layer):
    def __init__(self, embed_dim, dense_dim, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.dense_dim = dense_dim
        self.num_heads = num_heads
        self.attention = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.dense_proj = keras.Sequential([layers.Dense(dense_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm_1 = layers.LayerNormalization()
        self.layernorm_2 = layers.LayerNormalization()
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is not None:
            padding_mask = ops.cast(mask[:, None, :], dtype="int32")
        else:
            padding_mask = None
        attention_output = self.attention(query=inputs, value=inputs, key=inputs, attention_mask=padding_mask)
        proj_input = self.layernorm_1(inputs + attention_output)
        proj_output = self.dense_proj(proj_input)
        return self.layernorm_2(proj_input + proj_output)

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "dense_dim": self.dense_dim,
                "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package="real_models")
class PositionalEmbedding(layers.Layer):
    def __init__(self, sequence_length, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.token_embeddings = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.position_embeddings = layers.Embedding(input_dim=sequence_length, output_dim=embed_dim)
        self.sequence_length = sequence_length
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim

    def call(self, inputs):
        length = ops.shape(inputs)[-1]
        positions = ops.arange(0, length, 1)
        embedded_tokens = self.token_embeddings(inputs)
        embedded_positions = self.position_embeddings(positions)
        return embedded_tokens + embedded_positions

    def compute_mask(self, inputs, mask=None):
        return ops.not_equal(inputs, 0)

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length, "vocab_size": self.vocab_size,
                "embed_dim": self.embed_dim}


@keras.saving.register_keras_serializable(package="real_models")
class TransformerDecoder(layers.Layer):
    def __init__(self, embed_dim, latent_dim, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.latent_dim = latent_dim
        self.num_heads = num_heads
        self.attention_1 = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.attention_2 = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.dense_proj = keras.Sequential([layers.Dense(latent_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm_1 = layers.LayerNormalization()
        self.layernorm_2 = layers.LayerNormalization()
        self.layernorm_3 = layers.LayerNormalization()
        self.supports_masking = True

    def call(self, inputs, mask=None):
        inputs, encoder_outputs = inputs
        causal_mask = self.get_causal_attention_mask(inputs)
        if mask is None:
            inputs_padding_mask, encoder_outputs_padding_mask = None, None
        else:
            inputs_padding_mask, encoder_outputs_padding_mask = mask
        attention_output_1 = self.attention_1(
            query=inputs, value=inputs, key=inputs, attention_mask=causal_mask, query_mask=inputs_padding_mask
        )
        out_1 = self.layernorm_1(inputs + attention_output_1)
        attention_output_2 = self.attention_2(
            query=out_1,
            value=encoder_outputs,
            key=encoder_outputs,
            query_mask=inputs_padding_mask,
            key_mask=encoder_outputs_padding_mask,
        )
        out_2 = self.layernorm_2(out_1 + attention_output_2)
        proj_output = self.dense_proj(out_2)
        return self.layernorm_3(out_2 + proj_output)

    def get_causal_attention_mask(self, inputs):
        input_shape = ops.shape(inputs)
        batch_size, sequence_length = input_shape[0], input_shape[1]
        i = ops.arange(sequence_length)[:, None]
        j = ops.arange(sequence_length)
        mask = ops.cast(i >= j, dtype="int32")
        mask = ops.reshape(mask, (1, input_shape[1], input_shape[1]))
        return ops.broadcast_to(mask, (batch_size, sequence_length, sequence_length))

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "latent_dim": self.latent_dim,
                "num_heads": self.num_heads}


def translator(embed_dim=16, latent_dim=32, num_heads=2):
    encoder_inputs = keras.Input(shape=(None,), dtype="int64", name="encoder_inputs")
    x = PositionalEmbedding(SEQ, VOCAB, embed_dim)(encoder_inputs)
    encoder_outputs = TransformerEncoder(embed_dim, latent_dim, num_heads)(x)
    decoder_inputs = keras.Input(shape=(None,), dtype="int64", name="decoder_inputs")
    x = PositionalEmbedding(SEQ, VOCAB, embed_dim)(decoder_inputs)
    x = TransformerDecoder(embed_dim, latent_dim, num_heads)([x, encoder_outputs])
    x = layers.Dropout(0.5)(x)
    decoder_outputs = layers.Dense(VOCAB, activation="softmax")(x)
    model = keras.Model(
        {"encoder_inputs": encoder_inputs, "decoder_inputs": decoder_inputs}, decoder_outputs, name="transformer"
    )
    model.compile("rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _padded_tokens(rng, n, length):
    """Token ids with trailing padding (id 0), at least one real token per row."""
    tokens = rng.integers(1, VOCAB, (n, length))
    lengths = rng.integers(1, length + 1, (n,))
    return np.where(np.arange(length)[None, :] < lengths[:, None], tokens, 0)


def translator_data(rng, n=16):
    x = {"encoder_inputs": _padded_tokens(rng, n, SEQ), "decoder_inputs": _padded_tokens(rng, n, SEQ)}
    return x, rng.integers(0, VOCAB, (n, SEQ))


# --- keras.io: Timeseries classification with a Transformer model ------------
# The example's functions as published (Keras 3 version); the benchmark uses
# its sizes (T = 500, head_size 256, 4 heads, 4 blocks, dropout 0.25), the
# tests small ones.


def transformer_encoder(inputs, head_size, num_heads, ff_dim, dropout=0):
    x = layers.MultiHeadAttention(key_dim=head_size, num_heads=num_heads, dropout=dropout)(inputs, inputs)
    x = layers.Dropout(dropout)(x)
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    res = x + inputs
    x = layers.Conv1D(filters=ff_dim, kernel_size=1, activation="relu")(res)
    x = layers.Dropout(dropout)(x)
    x = layers.Conv1D(filters=inputs.shape[-1], kernel_size=1)(x)
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    return x + res


def timeseries_classifier(input_shape=(SEQ, 1), head_size=8, num_heads=2, ff_dim=4, num_transformer_blocks=2,
                          mlp_units=(16,), dropout=0.25, mlp_dropout=0.4, n_classes=2):
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for _ in range(num_transformer_blocks):
        x = transformer_encoder(x, head_size, num_heads, ff_dim, dropout)
    x = layers.GlobalAveragePooling1D(data_format="channels_last")(x)
    for dim in mlp_units:
        x = layers.Dense(dim, activation="relu")(x)
        x = layers.Dropout(mlp_dropout)(x)
    outputs = layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Adam(learning_rate=1e-4),
                  metrics=["sparse_categorical_accuracy"])
    return model


def timeseries_data(rng, n=16, length=SEQ):
    return rng.standard_normal((n, length, 1)).astype("float32"), rng.integers(0, 2, (n,))


# --- keras-hub ---------------------------------------------------------------


def bert_classifier(dropout=0.0):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=SEQ, dropout=dropout,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None, dropout=0.1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def bert_data(rng, n=16):
    padding = _padded_tokens(rng, n, SEQ) > 0
    x = {
        "token_ids": np.where(padding, rng.integers(1, VOCAB, (n, SEQ)), 0),
        "segment_ids": (np.arange(SEQ)[None, :] >= SEQ // 2).astype("int32") * padding,
        "padding_mask": padding,
    }
    return x, rng.integers(0, 3, (n,))


def gpt2_causal_lm(dropout=0.0):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=SEQ, dropout=dropout,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), sampler="greedy")
    return model


def gpt2_data(rng, n=16):
    padding = _padded_tokens(rng, n, SEQ) > 0
    x = {"token_ids": np.where(padding, rng.integers(1, VOCAB, (n, SEQ)), 0), "padding_mask": padding}
    return x, np.roll(x["token_ids"], -1, axis=1)


def hub_encoder_decoder(embed_dim=16):
    """keras-hub TransformerEncoder/TransformerDecoder in a functional model."""
    import keras_hub

    source = keras.Input((SEQ,), dtype="int32", name="source")
    target = keras.Input((SEQ,), dtype="int32", name="target")
    source_mask = keras.Input((SEQ,), dtype="bool", name="source_mask")
    embed = keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, embed_dim)
    enc = keras_hub.layers.TransformerEncoder(intermediate_dim=32, num_heads=2)(
        embed(source), padding_mask=source_mask
    )
    dec = keras_hub.layers.TransformerDecoder(intermediate_dim=32, num_heads=2, normalize_first=True)(
        embed(target), enc, encoder_padding_mask=source_mask, use_causal_mask=True
    )
    model = keras.Model({"source": source, "target": target, "source_mask": source_mask},
                        layers.Dense(VOCAB)(dec), name="hub_seq2seq")
    model.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def hub_encoder_decoder_data(rng, n=16):
    source = _padded_tokens(rng, n, SEQ)
    x = {"source": source, "target": _padded_tokens(rng, n, SEQ), "source_mask": source > 0}
    return x, rng.integers(0, VOCAB, (n, SEQ))


MODELS = {
    "keras_io_text_classifier": (text_classifier, text_classifier_data),
    "keras_io_translator": (translator, translator_data),
    "keras_io_timeseries": (timeseries_classifier, timeseries_data),
    "keras_hub_bert_classifier": (bert_classifier, bert_data),
    "keras_hub_gpt2_causal_lm": (gpt2_causal_lm, gpt2_data),
    "keras_hub_encoder_decoder": (hub_encoder_decoder, hub_encoder_decoder_data),
}

# How many attention and layer-norm layers each model holds (all are convertible).
EXPECTED_FUSED = {
    "keras_io_text_classifier": {"MultiHeadAttention": 1, "LayerNormalization": 2},
    "keras_io_translator": {"MultiHeadAttention": 3, "LayerNormalization": 5},
    "keras_io_timeseries": {"MultiHeadAttention": 2, "LayerNormalization": 4},
    "keras_hub_bert_classifier": {"MultiHeadAttention": 2, "LayerNormalization": 5},
    "keras_hub_gpt2_causal_lm": {"CachedMultiHeadAttention": 2, "LayerNormalization": 5},
    "keras_hub_encoder_decoder": {"MultiHeadAttention": 1, "CachedMultiHeadAttention": 2, "LayerNormalization": 5},
}

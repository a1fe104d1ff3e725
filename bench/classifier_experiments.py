"""What makes the from-scratch spam classifier beat TF-IDF + logistic regression?

Each lever of issue 7 is a set of `section.key=value` overrides of params.yaml; this
script runs each as a real DVC experiment of this repository and tabulates them from
`dvc exp show`:

    python bench/classifier_experiments.py run [--cv-folds K] [NAME ...]  # dvc exp run -n NAME -S ... per lever
    python bench/classifier_experiments.py table                         # Markdown table from `dvc exp show --json -A`
    python bench/classifier_experiments.py ensemble LEVER LEVER ...      # averaging their spam probabilities

`run` needs a git + DVC workspace of this project (the README's setup) with no
uncommitted params.yaml changes; it runs `dvc exp run -n <name> -S <override> ...
-S finetune_spam.cv_folds=K finetune_spam baseline_spam` for every lever not yet in
`dvc exp list`, one after the other in the workspace, and puts params.yaml back after
each. DVC reruns only the stages a lever changes (a pretraining lever reruns pretrain;
the others reuse it). K (default 5) makes finetune_spam also cross-validate on its
training messages (`finetune_spam.cv_folds`); the model it trains and its val/test
figures are the same as without.

The table has, per experiment: the k-fold cross-validation figures over the training
messages (balanced accuracy = the mean of ham and spam recall, i.e. the accuracy at the
50% spam of the book's test split; accuracy; spam F1), validation and test accuracy on
the book's balanced split, test spam F1, the held-out figures re-weighted to the
collection's ~13% spam (`heldout_traffic_*`, see `gptpkg.metrics.at_spam_share`), the
baseline's figures in the same run, the minutes of pretrain + finetune_spam without
the CV (their stage wall times) and the minutes the CV added.

The choice (`choose`): the lever with the best CV balanced accuracy; a tie with the
defaults keeps the defaults. Once levers have seed reruns (rows `<lever>, seed=N`; a bare
`seed=N` reruns the defaults), the choice is among the levers with seed reruns, by their
mean over all their seeds: one run at one seed ranks levers a few messages apart by
luck, which is why the later rounds screened at seed 123 and reran the best with seeds 2
and 3. The validation split (149 messages) is too small to rank levers, and the test
columns are reported, never used to choose. The seed rows measure the noise of one
configuration and the baseline row changes only the baseline, so neither is a
candidate.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptpkg.metrics import at_spam_share, classification_metrics  # noqa: E402  (no torch)

# name -> overrides (as `dvc exp run -S` takes them). The defaults in params.yaml are the
# row named "defaults"; every other row changes one lever (or a pair that belongs
# together) from them.
LEVERS: dict[str, list[str]] = {
    "defaults": [],
    # seed noise: the same configuration, other fine-tuning seeds (batch order, head init)
    "seed=2": ["finetune_spam.seed=2"],
    "seed=3": ["finetune_spam.seed=3"],
    # the classifier's pooling: the mean over the real tokens vs the last real token
    "pooling=mean": ["finetune_spam.pooling=mean"],
    # training data: the book's balanced 1,045 messages vs every non-val/test message
    "train_data=book (balanced), no class weights": ["finetune_spam.train_data=book",
                                                     "finetune_spam.class_weights=null"],
    "class_weights=[1,1]": ["finetune_spam.class_weights=[1.0,1.0]"],
    "class_weights=[1,6]": ["finetune_spam.class_weights=[1.0,6.0]"],
    "class_weights=[1,9.5] (inverse frequency)": ["finetune_spam.class_weights=[1.0,9.5]"],
    # which layers train
    "trainable=last_blocks (1 block + head, the book's)": ["finetune_spam.trainable=last_blocks"],
    "freeze_embeddings=true": ["finetune_spam.freeze_embeddings=true"],
    # learning rate and schedule
    "lr=0.001": ["finetune_spam.lr=0.001"],
    "lr=0.0002": ["finetune_spam.lr=0.0002"],
    "lr=0.0003": ["finetune_spam.lr=0.0003"],
    "lr=0.0007": ["finetune_spam.lr=0.0007"],
    "epochs=3": ["finetune_spam.epochs=3.0"],
    "epochs=4": ["finetune_spam.epochs=4.0"],
    "min_lr_ratio=1.0 (constant lr after warmup)": ["finetune_spam.min_lr_ratio=1.0"],
    "warmup_steps=0": ["finetune_spam.warmup_steps=0"],
    "warmup_steps=60": ["finetune_spam.warmup_steps=60"],
    "weight_decay=0.0": ["finetune_spam.weight_decay=0.0"],
    "weight_decay=0.3": ["finetune_spam.weight_decay=0.3"],
    # dropout: the fine-tuned model keeps the pretrained checkpoint's drop_rate
    "pretrain.drop_rate=0.1 (dropout in pretraining and fine-tuning)": ["pretrain.drop_rate=0.1"],
    # pretraining: none, the book's corpus, more text, more steps
    "no pretraining (init=scratch)": ["finetune_spam.init=scratch"],
    "pretrain corpus=[the-verdict.txt] (the book's)": ["pretrain.corpus=[the-verdict.txt]"],
    "pretrain corpus=[sms, tinyshakespeare, verdict], 300 steps":
        ["pretrain.corpus=[sms,tinyshakespeare.txt,the-verdict.txt]", "pretrain.max_steps=300"],
    # the default since the CV choice of 2026-11-24 (2 epochs cap max_steps=300 at 206)
    "pretrain 206 steps (2 epochs of the SMS corpus)": ["pretrain.max_steps=300"],
    "pretrain 60 steps (the default before the CV choice)": ["pretrain.max_steps=60"],
    "pretrain 200 steps": ["pretrain.max_steps=200"],
    "pretrain 500 steps (5 epochs)": ["pretrain.epochs=5.0", "pretrain.max_steps=500"],
    "pretrain batch_size=16 (60 steps, twice the tokens)": ["pretrain.batch_size=16"],
    "pretrain 8 epochs (824 steps)": ["pretrain.epochs=8.0", "pretrain.max_steps=1000"],
    # averaging fine-tunings (finetune_spam.soup): n members from one start, seeds seed..seed+n-1
    "soup=3 (3 fine-tunings averaged)": ["finetune_spam.soup=3"],
    "soup=3, seed=2": ["finetune_spam.soup=3", "finetune_spam.seed=2"],  # its seed noise (members 2,3,4)
    "soup=3, seed=3": ["finetune_spam.soup=3", "finetune_spam.seed=3"],  # (members 3,4,5)
    "soup=3, seed=4": ["finetune_spam.soup=3", "finetune_spam.seed=4"],  # (members 4,5,6)
    "soup=3, seed=5": ["finetune_spam.soup=3", "finetune_spam.seed=5"],  # (members 5,6,7)
    "soup=5 (5 fine-tunings averaged)": ["finetune_spam.soup=5"],
    "pretrain 8 epochs + soup=3": ["pretrain.epochs=8.0", "pretrain.max_steps=1000", "finetune_spam.soup=3"],
    # its seed noise (members' seeds 2,3,4 and 3,4,5), for the seed-mean check of the rule
    "pretrain 8 epochs + soup=3, seed=2": ["pretrain.epochs=8.0", "pretrain.max_steps=1000", "finetune_spam.soup=3",
                                           "finetune_spam.seed=2"],
    "pretrain 8 epochs + soup=3, seed=3": ["pretrain.epochs=8.0", "pretrain.max_steps=1000", "finetune_spam.soup=3",
                                           "finetune_spam.seed=3"],
    "pretrain 8 epochs + soup=3, seed=4": ["pretrain.epochs=8.0", "pretrain.max_steps=1000", "finetune_spam.soup=3",
                                           "finetune_spam.seed=4"],
    "pretrain 8 epochs + soup=3, seed=5": ["pretrain.epochs=8.0", "pretrain.max_steps=1000", "finetune_spam.soup=3",
                                           "finetune_spam.seed=5"],
    # Round 3, on the defaults of e9ab828 (8 pretraining epochs + soup=3; that row is
    # "pretrain 8 epochs + soup=3": CV 97.59% at seed 123, 97.76% mean over seeds 123/2/3).
    # Rule, written 2026-11-24 08:06 UTC before any round-3 run: screen every r3 lever at
    # seed 123 (5-fold CV); the two best that beat 97.59% get fine-tuning seeds 2 and 3;
    # the better 3-seed mean is adopted iff it beats 97.76% and the default pipeline stays
    # inside 15 minutes. Test figures are not read before the adoption commit.
    "r3 finetune epochs=3": ["finetune_spam.epochs=3.0"],
    "r3 finetune lr=0.001": ["finetune_spam.lr=0.001"],
    "r3 finetune weight_decay=0.0": ["finetune_spam.weight_decay=0.0"],
    "r3 pretrain drop_rate=0.1": ["pretrain.drop_rate=0.1"],
    "r3 pretrain lr=0.002": ["pretrain.lr=0.002"],
    "r3 model=cpu-small (d=256, 6 layers), pretrain 4 epochs": ["pretrain.model=cpu-small", "pretrain.epochs=4.0"],
    # the screen's two best (CV 97.80% and 97.79% at seed 123) get fine-tuning seeds 2 and 3
    "r3 finetune epochs=3, seed=2": ["finetune_spam.epochs=3.0", "finetune_spam.seed=2"],
    "r3 finetune epochs=3, seed=3": ["finetune_spam.epochs=3.0", "finetune_spam.seed=3"],
    "r3 pretrain drop_rate=0.1, seed=2": ["pretrain.drop_rate=0.1", "finetune_spam.seed=2"],
    "r3 pretrain drop_rate=0.1, seed=3": ["pretrain.drop_rate=0.1", "finetune_spam.seed=3"],
    # Round 4, on the defaults of 5bdd3bd (round 3's pick, pretrain drop_rate=0.1; its rows
    # are "r3 pretrain drop_rate=0.1" and its seed rows: mean CV 97.91% over seeds 123/2/3).
    # Rule, written 2026-11-24 15:36 UTC before any round-4 run: both r4 levers are run at
    # fine-tuning seeds 123, 2 and 3 (a lever's seed rows run right after it in the same
    # workspace, so its pretraining is trained once); the better 3-seed mean is adopted iff
    # it beats 97.91% and the default pipeline stays inside 15 minutes. Test figures are not
    # read before the adoption commit.
    # longer pretraining: the val loss still fell at 8 epochs (6.02 at step 510, 5.93 at 824);
    # 10 epochs = 1030 steps, ~+115 s of the pipeline's 260 s to spare
    "r4 pretrain 10 epochs": ["pretrain.epochs=10.0", "pretrain.max_steps=1200"],
    "r4 pretrain 10 epochs, seed=2": ["pretrain.epochs=10.0", "pretrain.max_steps=1200", "finetune_spam.seed=2"],
    "r4 pretrain 10 epochs, seed=3": ["pretrain.epochs=10.0", "pretrain.max_steps=1200", "finetune_spam.seed=3"],
    # more dropout, as 0.1 beat 0.0 (no time cost)
    "r4 pretrain drop_rate=0.2": ["pretrain.drop_rate=0.2"],
    "r4 pretrain drop_rate=0.2, seed=2": ["pretrain.drop_rate=0.2", "finetune_spam.seed=2"],
    "r4 pretrain drop_rate=0.2, seed=3": ["pretrain.drop_rate=0.2", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3): 10 epochs 97.70/97.74/97.92% (mean 97.79%), drop_rate=0.2
    # 96.71/96.85/96.92% (mean 96.83%); neither beats 97.91%, so the defaults stay.
    # Round 5, on the same defaults: round 3's two next-best screen levers, now on top of the
    # dropout. Rule, written 2026-11-24 17:06 UTC before any round-5 run: as round 4's (seeds
    # 123/2/3 each, the better mean adopted iff it beats 97.91% inside 15 minutes; epochs=3
    # adds ~50 s of fine-tuning), test figures unread before the outcome is committed.
    "r5 finetune epochs=3": ["finetune_spam.epochs=3.0"],
    "r5 finetune epochs=3, seed=2": ["finetune_spam.epochs=3.0", "finetune_spam.seed=2"],
    "r5 finetune epochs=3, seed=3": ["finetune_spam.epochs=3.0", "finetune_spam.seed=3"],
    "r5 finetune weight_decay=0.0": ["finetune_spam.weight_decay=0.0"],
    "r5 finetune weight_decay=0.0, seed=2": ["finetune_spam.weight_decay=0.0", "finetune_spam.seed=2"],
    "r5 finetune weight_decay=0.0, seed=3": ["finetune_spam.weight_decay=0.0", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): epochs=3 97.90/97.71/98.05% (mean 97.885%),
    # weight_decay=0.0 97.75/98.02/97.96% (mean 97.911% against the defaults' 97.907%: it passes
    # the rule by 0.004 points, far under one message). Adopted by the rule on 2026-11-24 18:40 UTC,
    # before its test columns were read: params.yaml finetune_spam.weight_decay 0.1 -> 0.0.
    # Round 6, on those defaults (the rows "r5 finetune weight_decay=0.0", seeds 123/2/3: CV
    # mean 97.911%): decide for the balanced mix the CV and the test measure, i.e. shift the
    # spam logit by Bayes' rule from the class-weighted training mix (~24% spam) to 50%
    # after training (finetune.decision_offset; no time cost, the training is the
    # defaults', so each seed row pairs with its r5 row). Rule, written 2026-11-24 18:55 UTC
    # before any round-6 run: adopt iff its CV mean over seeds 123/2/3 beats 97.911%; test
    # figures unread before the outcome is committed.
    "r6 decision_spam_share=0.5": ["finetune_spam.decision_spam_share=0.5"],
    "r6 decision_spam_share=0.5, seed=2": ["finetune_spam.decision_spam_share=0.5", "finetune_spam.seed=2"],
    "r6 decision_spam_share=0.5, seed=3": ["finetune_spam.decision_spam_share=0.5", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): 97.909 / 98.023 / 98.012% (mean 97.981%)
    # against 97.750 / 98.023 / 97.960% with the same trainings deciding as trained: +2 spam and
    # +5 ham flagged at seed 123, no decision changed at seed 2, +1 spam and +5 ham at seed 3.
    # It beats 97.911% by 0.07 points (under one spam message), so by the rule it is adopted
    # (2026-11-24 19:45 UTC, before its test columns were read): decision_spam_share 0.5.
    # Round 7, on the defaults of 01d258d (the rows "r6 decision_spam_share=0.5", seeds
    # 123/2/3: CV mean 97.981%): pretraining's softmax over the SMS corpus's 9,592 tokens
    # instead of all 50,257 (pretrain.lm_vocab=corpus; ~2.7x faster pretraining steps, for
    # the 15-minute budget, which slow hours of this machine exceeded). Rule, written
    # 2026-11-24 21:25 UTC before any round-7 run: run it at fine-tuning seeds 123, 2 and 3;
    # adopt it iff its CV mean is at least 97.873% (the defaults' 97.981% minus 0.108 points,
    # one CV spam message of 463: it is adopted for the time it saves, so it must not lose
    # more than that, and need not win); test figures unread before the outcome is committed.
    "r7 pretrain lm_vocab=corpus": ["pretrain.lm_vocab=corpus"],
    "r7 pretrain lm_vocab=corpus, seed=2": ["pretrain.lm_vocab=corpus", "finetune_spam.seed=2"],
    "r7 pretrain lm_vocab=corpus, seed=3": ["pretrain.lm_vocab=corpus", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): 97.699 / 97.893 / 97.938% (mean 97.843%)
    # against the defaults' 97.909 / 98.023 / 98.012% (97.981%): 0.14 points lower, short of the
    # 97.873% the rule asks by 0.03, so lm_vocab stays full (2026-11-24 21:58 UTC).
    # Round 8, on the same defaults (CV mean 97.981% over seeds 123/2/3): every ASCII digit
    # its own token (prepare.tokenizer=gpt2-digits). 585 of the collection's 747 spam hold a
    # run of 5+ digits and 3 of its 4,827 ham do, but GPT-2's BPE cuts each number into
    # arbitrary 1-4 digit chunks (" 09" "06" "17" "01" "461"); with single digits every
    # phone number and short code is the same ten tokens. It reruns prepare, pretrain
    # (+4.8% tokens) and finetune_spam. Rule, written 2026-11-24 23:56 UTC before any
    # round-8 run: run it at fine-tuning seeds 123, 2 and 3; adopt it iff its CV mean beats
    # 97.981% and the default pipeline stays inside 15 minutes; test figures unread before
    # the outcome is committed.
    "r8 prepare tokenizer=gpt2-digits": ["prepare.tokenizer=gpt2-digits"],
    "r8 prepare tokenizer=gpt2-digits, seed=2": ["prepare.tokenizer=gpt2-digits", "finetune_spam.seed=2"],
    "r8 prepare tokenizer=gpt2-digits, seed=3": ["prepare.tokenizer=gpt2-digits", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): 97.875 / 97.415 / 97.790% (mean 97.693%)
    # against the defaults' 97.909 / 98.023 / 98.012% (97.981%): lower at every seed; CV spam
    # missed 18 / 21 / 19 of 463, ham flagged 16 / 28 / 14 of 4,419. Not adopted: prepare.tokenizer
    # stays gpt2 (2026-11-25 00:42 UTC).
    # Round 9, on the same defaults (CV mean 97.981%): average five fine-tunings instead of
    # three (soup 1 -> 3 gave +0.2-0.4 CV points in round 2; ~+66 s of the pipeline's 642 s).
    # Rule, written 2026-11-25 00:44 UTC before any round-9 run: run it at fine-tuning seeds
    # 123, 2 and 3 (members seed..seed+4) on a 1-thread default pretraining; adopt it iff its
    # CV mean beats 97.981% and the default pipeline stays inside 15 minutes; test figures
    # unread before the outcome is committed.
    "r9 finetune soup=5": ["finetune_spam.soup=5"],
    "r9 finetune soup=5, seed=2": ["finetune_spam.soup=5", "finetune_spam.seed=2"],
    "r9 finetune soup=5, seed=3": ["finetune_spam.soup=5", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): 97.852 / 98.035 / 98.120% (mean 98.002%)
    # against the defaults' 97.909 / 98.023 / 98.012% (97.981%): +0.021 points, a fifth of one CV
    # spam message; the default pipeline with it took 815.5 s (< 900). Adopted by the rule:
    # finetune_spam.soup 5 (2026-11-25 02:16 UTC).
    # Round 10, on the defaults of ebc6ea8 (the r9 rows, CV mean 98.002%): train on the
    # validation messages too (train_data=nontest: 5,048 messages, 550 spam, against all's
    # 4,882 and 463; 9 validation texts that hold a test text stay out). Its CV folds over
    # the same `all` messages with the same folds as the r9 rows, the validation messages
    # training in every fold, so the CV columns compare message for message.
    # Rule, written 2026-11-25 02:47 UTC before any round-10 run: run it at fine-tuning seeds
    # 123, 2 and 3 on the 1-thread default pretraining of rounds 8-9; adopt it iff its CV mean
    # beats 98.002% and the default pipeline stays inside 15 minutes; test figures unread
    # before the outcome is committed. (Its val columns are then not held out.)
    "r10 finetune train_data=nontest": ["finetune_spam.train_data=nontest"],
    "r10 finetune train_data=nontest, seed=2": ["finetune_spam.train_data=nontest", "finetune_spam.seed=2"],
    "r10 finetune train_data=nontest, seed=3": ["finetune_spam.train_data=nontest", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, same messages and folds as the r9 rows, test columns
    # unread): 97.915 / 97.978 / 98.035% (mean 97.976%) against 97.852 / 98.035 / 98.120%
    # (98.002%); CV spam missed 17 / 16 / 16 of 463 (r9: 18 / 16 / 15). Not adopted:
    # train_data stays all (2026-11-25 03:36 UTC).
    # Round 11, on the same defaults: frame each message as the SMS pretraining corpus does,
    # between two <|endoftext|>, and pool at the closing one (framing=eot).
    # Rule, written 2026-11-25 02:53 UTC before any round-11 run: seeds 123, 2 and 3 on the
    # same 1-thread pretraining; it passes iff its CV mean beats 98.002% and the default
    # pipeline stays inside 15 minutes. If rounds 10 and 11 both pass, the combination runs at
    # the same seeds and is adopted iff its CV mean beats both; otherwise the round with the
    # higher CV mean is adopted. Test figures unread before the outcome is committed.
    "r11 finetune framing=eot": ["finetune_spam.framing=eot"],
    "r11 finetune framing=eot, seed=2": ["finetune_spam.framing=eot", "finetune_spam.seed=2"],
    "r11 finetune framing=eot, seed=3": ["finetune_spam.framing=eot", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): 97.540 / 98.001 / 97.915% (mean
    # 97.819%) against 97.852 / 98.035 / 98.120% (98.002%): lower at every seed; CV spam missed
    # 21 / 16 / 17 of 463. Not adopted: framing stays plain; round 10 failed too, so no
    # combination ran (2026-11-25 04:00 UTC).
    # Round 12, on the same defaults: no dropout while fine-tuning (finetune_spam.drop_rate=0.0;
    # null = the pretraining's 0.1). Round 3 set dropout 0.1 for pretraining and fine-tuning
    # together, round 4 tried 0.2 for both; fine-tuning's own dropout was never measured apart,
    # and the soup of five already averages out what dropout regularizes.
    # Rule, written 2026-11-25 04:19 UTC before any round-12 run: seeds 123, 2 and 3 on the same
    # 1-thread pretraining; adopt it iff its CV mean beats 98.002% and the default pipeline
    # stays inside 15 minutes; test figures unread before the outcome is committed.
    "r12 finetune drop_rate=0.0": ["finetune_spam.drop_rate=0.0"],
    "r12 finetune drop_rate=0.0, seed=2": ["finetune_spam.drop_rate=0.0", "finetune_spam.seed=2"],
    "r12 finetune drop_rate=0.0, seed=3": ["finetune_spam.drop_rate=0.0", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): 97.875 / 97.881 / 98.035% (mean
    # 97.930%) against 98.002%. Not adopted: drop_rate stays null (2026-11-25 05:44 UTC).
    # Rounds 13 and 14, on the same defaults, side by side (each costs no compute):
    # r13 label smoothing 0.1 in fine-tuning (targets 0.95 / 0.05 instead of 1 / 0): the test
    # spam missed are read as ham with confident probabilities (round 6), which smoothing
    # discourages; r14 layer-wise lr decay 0.8 (the top block at 0.8 x lr, the embeddings at
    # 0.33 x): the lower, more general pretrained layers move less while fine-tuning.
    # Rule, written 2026-11-25 06:00 UTC before any round-13/14 run: each at seeds 123, 2 and 3
    # on the same 1-thread pretraining as rounds 8-12; a round passes iff its CV mean beats the
    # r9 rows' 98.002%; if both pass, the one with the higher CV mean is adopted (their
    # combination left to a later round). Neither changes the pipeline's compute; its time is
    # re-measured after an adoption. Test figures unread before the outcome is committed.
    "r13 finetune label_smoothing=0.1": ["finetune_spam.label_smoothing=0.1"],
    "r13 finetune label_smoothing=0.1, seed=2": ["finetune_spam.label_smoothing=0.1", "finetune_spam.seed=2"],
    "r13 finetune label_smoothing=0.1, seed=3": ["finetune_spam.label_smoothing=0.1", "finetune_spam.seed=3"],
    "r14 finetune lr_layer_decay=0.8": ["finetune_spam.lr_layer_decay=0.8"],
    "r14 finetune lr_layer_decay=0.8, seed=2": ["finetune_spam.lr_layer_decay=0.8", "finetune_spam.seed=2"],
    "r14 finetune lr_layer_decay=0.8, seed=3": ["finetune_spam.lr_layer_decay=0.8", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): r13 97.836 / 97.967 / 98.131% (mean
    # 97.978%), r14 97.353 / 97.523 / 97.347% (mean 97.408%), against 98.002%. Neither passes:
    # label_smoothing stays 0, lr_layer_decay 1 (2026-11-25 07:05 UTC).
    # Round 15, on the same defaults: mean pooling (the mean of the hidden states over a
    # message's real tokens) instead of the last real token's. Round 1 rejected it on 149
    # validation messages after 60 pretraining steps; it was never cross-validated on the
    # pretraining of now, which the last token reads through four layers of causal attention.
    # Rule, written 2026-11-25 07:19 UTC before any round-15 run: seeds 123, 2 and 3 on the same
    # 1-thread pretraining as rounds 8-14 (three 1-thread runs at once); adopted iff its CV mean
    # beats the r9 rows' 98.002% (same compute, so the pipeline's time stands). Test figures
    # unread before the outcome is committed.
    "r15 finetune pooling=mean": ["finetune_spam.pooling=mean"],
    "r15 finetune pooling=mean, seed=2": ["finetune_spam.pooling=mean", "finetune_spam.seed=2"],
    "r15 finetune pooling=mean, seed=3": ["finetune_spam.pooling=mean", "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): 97.319 / 97.546 / 97.427% (mean
    # 97.430%) against 98.002%: lower at every seed. Not adopted: pooling stays last_real_token
    # (2026-11-25 07:52 UTC).
    # Round 16, on the same defaults: a pretraining ensemble. Every round so far changed one
    # model; the soup (round 9) averages fine-tunings of one pretraining, whose errors it
    # shares. Two pretrainings that differ only in pretrain.seed (123, 124), each fine-tuned
    # with the defaults (soup of 5), averaged in spam probability. Both with
    # pretrain.lm_vocab=corpus: two full-softmax pretrainings alone would take ~15 minutes,
    # two corpus ones about one full one (README "Training speed"). The ensemble's CV needs no
    # new param to measure: the members run as the experiments below, each member's run at
    # a fine-tuning seed has the same folds (same seed, same messages), and `ensemble`
    # averages their held-out probabilities message by message: every fold of the ensemble
    # is the two members trained on the same other folds.
    # Rule, written 2026-11-25 08:25 UTC before any round-16 run: the ensemble of the two rows
    # at each of seeds 123, 2 and 3 (1-thread runs); adopted iff its CV mean beats the r9 rows'
    # 98.002% and the pipeline with it (two corpus pretrainings and two soups; estimated from
    # these runs' stage times, then measured) stays under 15 minutes. Adopted means built into
    # the pipeline as a param (members in pretrain, finetune_spam and the ONNX export) before
    # it becomes the default. Test figures unread before the outcome is committed.
    "r16 pretrain lm_vocab=corpus": ["pretrain.lm_vocab=corpus"],
    "r16 pretrain lm_vocab=corpus, seed=2": ["pretrain.lm_vocab=corpus", "finetune_spam.seed=2"],
    "r16 pretrain lm_vocab=corpus, seed=3": ["pretrain.lm_vocab=corpus", "finetune_spam.seed=3"],
    "r16 pretrain lm_vocab=corpus, pretrain_seed=124": ["pretrain.lm_vocab=corpus", "pretrain.seed=124"],
    "r16 pretrain lm_vocab=corpus, pretrain_seed=124, seed=2": ["pretrain.lm_vocab=corpus", "pretrain.seed=124",
                                                                "finetune_spam.seed=2"],
    "r16 pretrain lm_vocab=corpus, pretrain_seed=124, seed=3": ["pretrain.lm_vocab=corpus", "pretrain.seed=124",
                                                                "finetune_spam.seed=3"],
    # Outcome (CV over seeds 123/2/3, test columns unread): the ensemble 97.711 / 98.001 / 97.938%
    # (mean 97.883%) against 98.002%; its members 97.677 / 97.904 / 97.830% (pretrain seed 123)
    # and 98.057 / 97.762 / 97.677% (124). Not adopted (2026-11-25 09:46 UTC). Of the members'
    # 35-44 CV errors per seed, 31-34 are shared by both: averaging cannot move them.
    # model size and context
    "model=cpu-small (d=256, 6 layers), 206 pretrain steps": ["pretrain.model=cpu-small", "pretrain.max_steps=300"],
    "max_length=64": ["finetune_spam.max_length=64"],
    # the baseline on the classifier's training data (imbalanced, no class weights)
    "baseline_spam.train_data=all": ["baseline_spam.train_data=all"],
}

TARGETS = ["finetune_spam", "baseline_spam"]


def configuration(lever: str) -> str:
    """The lever a seed row reruns with another fine-tuning seed ("soup=3, seed=2" ->
    "soup=3"; a bare "seed=2" -> "defaults"); any other lever is its own."""
    m = re.fullmatch(r"(?:(.+), )?seed=\d+", lever)
    if m is None:
        return lever
    base = m.group(1) or "defaults"
    return {"soup=3": "soup=3 (3 fine-tunings averaged)"}.get(base, base)  # its seed rows name it short


# Rows that are not candidates of the choice: the seed reruns (they count in their
# lever's seed mean), and a lever of the baseline only (its classifier is the defaults').
NOT_CANDIDATES = {"baseline_spam.train_data=all"} | {lever for lever in LEVERS if configuration(lever) != lever}
CV_KEY = "finetune_spam.cv_folds"


def _dvc(*args: str, capture: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, text=True,
                          capture_output=capture, check=False)
    if proc.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
    return proc.stdout or ""


def run(names: list[str], cv_folds: int = 5) -> None:
    dirty = subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=ROOT, text=True,
                           capture_output=True, check=True).stdout.strip()
    if dirty:
        raise SystemExit("params.yaml has uncommitted changes; commit or revert them first "
                         "(every experiment is relative to the committed params)")
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; expected names from {list(LEVERS)}")
    if cv_folds != 0 and cv_folds < 2:
        raise SystemExit(f"--cv-folds: expected 0 (off) or >= 2, got {cv_folds}")
    done = set(_dvc("exp", "list", "--name-only", capture=True).split())
    for name, overrides in LEVERS.items():
        exp = exp_name(name)
        if (names and name not in names) or exp in done:
            continue
        overrides = [*overrides, f"{CV_KEY}={cv_folds}"]
        print(f"== {name}: dvc exp run -n {exp} " + " ".join(f"-S {o}" for o in overrides), flush=True)
        try:
            _dvc("exp", "run", "-n", exp, *[a for o in overrides for a in ("-S", o)], *TARGETS)
        finally:
            subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=ROOT, check=True)


def exp_name(lever: str) -> str:
    """A DVC experiment name (a git ref component) for a lever's description."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in lever)
    return "-".join(p for p in keep.split("-") if p)[:60]


def _get(data: dict, file: str, key: str):
    return ((data.get("metrics") or {}).get(file) or {}).get("data", {}).get(key)


def rows_from_exp_show(show: list[dict]) -> list[dict]:
    """One row per lever of LEVERS, from `dvc exp show --json -A`. A lever run on several
    commits (e.g. before and after cv_folds existed) is the run with CV figures if one
    has them, then the latest."""
    names = {exp_name(n): n for n in LEVERS}
    rows = []
    for commit in show:
        for exp in commit.get("experiments") or []:
            rev = exp["revs"][0]
            if rev.get("name") not in names or not rev.get("data"):
                continue
            d = rev["data"]
            ft = lambda key: _get(d, "metrics/finetune_spam.json", key)  # noqa: E731
            base = lambda key: _get(d, "metrics/baseline_spam.json", key)  # noqa: E731
            cv_s = _get(d, "metrics/runtime/finetune_spam.json", "cv_wall_time_s") or 0.0
            secs = sum(_get(d, f"metrics/runtime/{s}.json", "stage_wall_time_s") or 0.0
                       for s in ("pretrain", "finetune_spam"))
            rows.append({"lever": names[rev["name"]], "experiment": rev["name"],
                         "cv_folds": ft("cv_folds"),
                         "cv_balanced_accuracy": ft("cv_balanced_accuracy"),
                         "cv_accuracy": ft("cv_accuracy"),
                         "cv_spam_f1": ft("cv_spam_f1"),
                         "val_accuracy": ft("val_accuracy"),
                         "test_accuracy": ft("test_accuracy"),
                         "test_spam_f1": ft("test_spam_f1"),
                         "traffic_accuracy": ft("heldout_traffic_accuracy"),
                         "traffic_spam_f1": ft("heldout_traffic_spam_f1"),
                         "baseline_test_accuracy": base("test_accuracy"),
                         "baseline_traffic_accuracy": base("heldout_traffic_accuracy"),
                         "baseline_traffic_spam_f1": base("heldout_traffic_spam_f1"),
                         "minutes": (secs - cv_s) / 60, "cv_minutes": cv_s / 60,
                         "timestamp": d.get("timestamp") or ""})
    best: dict[str, dict] = {}
    for r in rows:
        rank = (r["cv_balanced_accuracy"] is not None, r["timestamp"])
        if r["lever"] not in best or rank > (best[r["lever"]]["cv_balanced_accuracy"] is not None,
                                             best[r["lever"]]["timestamp"]):
            best[r["lever"]] = r
    order = list(LEVERS)
    return sorted(best.values(), key=lambda r: order.index(r["lever"]))


def seed_means(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """lever -> (mean CV balanced accuracy over its own row and its seed rows, how many),
    for every lever with CV figures that has seed reruns with CV figures."""
    levers = {r["lever"] for r in rows if r["cv_balanced_accuracy"] is not None}
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["cv_balanced_accuracy"] is not None and configuration(r["lever"]) in levers:
            groups.setdefault(configuration(r["lever"]), []).append(r["cv_balanced_accuracy"])
    return {lever: (sum(v) / len(v), len(v)) for lever, v in groups.items() if len(v) > 1}


def choose(rows: list[dict]) -> dict | None:
    """The row with the best CV balanced accuracy among the candidates (rows with CV
    figures, not in NOT_CANDIDATES); once a lever other than the defaults has seed
    reruns, only levers with seed reruns compete, by their seed means. A tie with the
    defaults keeps the defaults, other ties go to the earlier lever. None when no
    candidate has CV figures."""
    cands = [r for r in rows if r["lever"] not in NOT_CANDIDATES and r["cv_balanced_accuracy"] is not None]
    if not cands:
        return None
    means = seed_means(rows)
    if any(lever != "defaults" for lever in means):
        cands = [r for r in cands if r["lever"] in means]
        score = {r["lever"]: means[r["lever"]][0] for r in cands}
    else:
        score = {r["lever"]: r["cv_balanced_accuracy"] for r in cands}
    best = max(score.values())
    tied = [r for r in cands if score[r["lever"]] == best]
    return next((r for r in tied if r["lever"] == "defaults"), tied[0])


def markdown(rows: list[dict]) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    f4 = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    cols = ["lever (change from the defaults)", "CV balanced acc", "CV acc", "CV spam F1", "val acc", "test acc",
            "test spam F1", "traffic acc", "traffic spam F1", "baseline test acc", "baseline traffic acc",
            "baseline traffic spam F1", "minutes", "CV minutes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append(f"| {r['lever']} | {pct(r['cv_balanced_accuracy'])} | {pct(r['cv_accuracy'])} "
                     f"| {f4(r['cv_spam_f1'])} | {pct(r['val_accuracy'])} | {pct(r['test_accuracy'])} "
                     f"| {f4(r['test_spam_f1'])} | {pct(r['traffic_accuracy'])} | {f4(r['traffic_spam_f1'])} "
                     f"| {pct(r['baseline_test_accuracy'])} | {pct(r['baseline_traffic_accuracy'])} "
                     f"| {f4(r['baseline_traffic_spam_f1'])} | {r['minutes']:.1f} | {r['cv_minutes']:.1f} |")
    means = seed_means(rows)
    if means:
        lines += ["", "Mean CV balanced accuracy over fine-tuning seeds: " + "; ".join(
            f"{lever} {pct(m)} ({n} seeds)" for lever, (m, n) in means.items()) + "."]
    best = choose(rows)
    if best is not None:
        folds = "/".join(map(str, sorted({r["cv_folds"] for r in rows if r["cv_folds"]})))
        if any(lever != "defaults" for lever in means):
            m, n = means[best["lever"]]
            lines += ["", f"Chosen by {folds}-fold CV balanced accuracy, mean over fine-tuning seeds: "
                          f"**{best['lever']}** ({pct(m)} over {n} seeds; its own row's test acc "
                          f"{pct(best['test_accuracy'])}, the baseline's {pct(best['baseline_test_accuracy'])})."]
        else:
            lines += ["", f"Chosen by {folds}-fold CV balanced accuracy: **{best['lever']}** "
                          f"(CV balanced acc {pct(best['cv_balanced_accuracy'])}; its test acc "
                          f"{pct(best['test_accuracy'])}, the baseline's {pct(best['baseline_test_accuracy'])})."]
    return "\n".join(lines)


PREDICTIONS = "metrics/finetune_spam_predictions.json"  # gptpkg.finetune.PREDICTIONS_FILE in params' paths.metrics


def exp_predictions(lever: str) -> dict:
    """The newest run of `lever` (an experiment ref of this repository) that has the
    classifier's predictions file (`finetune_spam` writes it since round 16)."""
    refs = subprocess.run(["git", "for-each-ref", "--sort=-creatordate", "--format=%(refname)", "refs/exps"],
                          cwd=ROOT, text=True, capture_output=True, check=True).stdout.split()
    name = exp_name(lever)
    for ref in refs:
        if ref.rsplit("/", 1)[-1] != name:
            continue
        shown = subprocess.run(["git", "show", f"{ref}:{PREDICTIONS}"], cwd=ROOT, text=True, capture_output=True)
        if shown.returncode == 0:
            return json.loads(shown.stdout)
    raise SystemExit(f"no experiment {name!r} with {PREDICTIONS} (run the lever {lever!r} first; fetch its refs "
                     f"from the workspace it ran in: git fetch DIR 'refs/exps/*:refs/exps/*')")


def ensemble_metrics(members: list[dict], parts: tuple[str, ...]) -> dict[str, float]:
    """The figures of the classifier that averages `members`' spam probabilities
    (prediction files of runs on the same messages; for "cv", the same folds): spam iff
    the mean probability > 0.5, as each member decides."""
    out: dict[str, float] = {}
    for part in parts:
        keys = [[(r["text"], r["label"]) for r in m[part]] for m in members]
        if any(k != keys[0] for k in keys[1:]) or not keys[0]:
            raise SystemExit(f"ensemble: the members' {part!r} predictions are not over the same messages")
        if part == "cv" and len({(m["cv_folds"], m["cv_seed"]) for m in members}) != 1:
            raise SystemExit("ensemble: the members' CV used different folds (cv_folds / finetune_spam.seed)")
        mean = [sum(m[part][i]["spam_probability"] for m in members) / len(members) for i in range(len(keys[0]))]
        got = classification_metrics([y for _, y in keys[0]], [int(p > 0.5) for p in mean], f"{part}_")
        if part == "cv":
            got["cv_balanced_accuracy"] = at_spam_share(got["cv_confusion"], 0.5)["accuracy"]
        out.update(got)
    return out


def cv_errors(predictions: dict) -> set[int]:
    """The CV-held-out messages (their positions) a run's decision gets wrong."""
    return {i for i, r in enumerate(predictions["cv"]) if int(r["spam_probability"] > 0.5) != r["label"]}


def seed_groups(members: list[str]) -> list[list[str]]:
    """The ensembles of `members` (levers without a seed suffix) at each fine-tuning seed
    all of them were run with: their own rows together, then their ", seed=N" rows."""
    suffixes = [""] + sorted({lever[len(members[0]):] for lever in LEVERS
                              if lever.startswith(members[0] + ", seed=") and configuration(lever) == members[0]})
    return [[m + sfx for m in members] for sfx in suffixes if all(m + sfx in LEVERS for m in members)]


def ensemble(members: list[str], with_test: bool) -> str:
    """One line per fine-tuning seed: each member's CV balanced accuracy and the
    ensemble's CV figures (and val/test with `with_test`), then the mean over seeds."""
    parts = ("cv", "val", "test") if with_test else ("cv",)
    pct = lambda v: f"{100 * v:.3f}%"  # noqa: E731
    lines, means = [], []
    for group in seed_groups(members):
        preds = [exp_predictions(lever) for lever in group]
        single = [ensemble_metrics([m], ("cv",))["cv_balanced_accuracy"] for m in preds]
        e = ensemble_metrics(preds, parts)
        means.append(e["cv_balanced_accuracy"])
        wrong = [cv_errors(m) for m in preds]
        line = (" + ".join(f"{lever} ({pct(b)}, {len(w)} CV errors)" for lever, b, w in zip(group, single, wrong))
                + f": {len(set.intersection(*wrong))} errors shared by all"
                + f" -> CV balanced acc {pct(e['cv_balanced_accuracy'])}, CV acc {pct(e['cv_accuracy'])}, "
                  f"CV spam F1 {e['cv_spam_f1']:.4f}, CV confusion {e['cv_confusion']}")
        if with_test:
            line += (f"; val acc {pct(e['val_accuracy'])}; test acc {pct(e['test_accuracy'])}, "
                     f"test spam F1 {e['test_spam_f1']:.4f}, test confusion {e['test_confusion']}")
        lines.append(line)
    lines.append(f"mean CV balanced accuracy of the ensemble over {len(means)} fine-tuning seed(s): "
                 f"{pct(sum(means) / len(means))}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the levers not yet in `dvc exp list`")
    r.add_argument("names", nargs="*", help="lever names (default: all)")
    r.add_argument("--cv-folds", type=int, default=5,
                   help="finetune_spam.cv_folds for every run (default 5; 0 = no cross-validation)")
    sub.add_parser("table", help="print the Markdown table from `dvc exp show --json -A`")
    e = sub.add_parser("ensemble", help="the figures of averaging levers' spam probabilities (from their runs' "
                                        "prediction files), one ensemble per group")
    e.add_argument("members", nargs="+", metavar="LEVER",
                   help="the members (levers without a seed suffix); their seed rows make the same ensemble at "
                        "the other fine-tuning seeds")
    e.add_argument("--with-test", action="store_true",
                   help="also the val and test figures (read them only after the choice: they never choose)")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.names, args.cv_folds)
    elif args.cmd == "ensemble":
        unknown = [n for n in args.members if n not in LEVERS]
        if unknown:
            raise SystemExit(f"unknown lever(s) {unknown}; expected names from {list(LEVERS)}")
        print(ensemble(args.members, args.with_test))
    else:
        print(markdown(rows_from_exp_show(json.loads(_dvc("exp", "show", "--json", "-A", capture=True)))))


if __name__ == "__main__":
    main()

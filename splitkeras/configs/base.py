"""Defaults shared by every experiment config; each config overrides a few.

Not a runnable config by itself: see the other files in this folder.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds initial weights, dropout masks and the data order
    # split | splitfed_v1 | splitfed_v2 | centralized | fedavg | large_batch_sgd
    c.method = "split"
    c.num_clients = 1  # clients; split with > 1 trains them round-robin
    # vanilla | ushaped (2 cut layers) | vertical | multihop (2 cut layers)
    # | multitask (one client segment, one server head per task)
    c.topology = "vanilla"
    c.weight_handoff = "peer"  # round-robin handoff: peer | server (AES-GCM)

    c.model = ml_collections.ConfigDict()
    c.model.name = "lenet5"  # a splitkeras.models name
    c.model.cut = "pool1"  # cut layer; "a,b" = U-shaped (labels stay home)
    c.model.kwargs = ml_collections.ConfigDict()  # extra model arguments

    c.data = ml_collections.ConfigDict()
    c.data.name = "fashion_mnist"  # a TFDS name
    c.data.path = config_dict.placeholder(str)  # IDX folder, .npz or TFDS dir
    c.data.download = True  # may TFDS download the dataset if missing
    # A folder of one file per party from `splitkeras partition`: each party
    # then reads only its own file (the server none). "" = every process
    # partitions the dataset itself.
    c.data.sites = ""
    # What a party without data (the server) builds its segment for; "" / 0
    # = the known shape and classes of data.name (mnist, fashion_mnist,
    # cifar10, cifar100, colorectal_histology, imagenet2012).
    c.data.input_shape = ""  # e.g. "28,28,1"
    c.data.num_classes = 0
    c.data.partition = "iid"  # how training data is spread: iid | dirichlet
    c.data.dirichlet_alpha = 0.5  # label skew of "dirichlet" (smaller = more)
    # Streaming datasets (imagenet2012), read per epoch from TFDS files:
    c.data.image_size = 224  # side of the square crops the model sees
    c.data.shuffle_buffer = 10_000  # encoded examples in each client's buffer
    c.data.cache = False  # keep each client's encoded shard in memory
    c.data.eval_split = "validation"  # the split evaluation reads
    c.data.drop_remainder = True  # drop each client's last partial batch

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 10  # passes over the training set
    c.train.batch_size = 64  # examples per step
    c.train.eval_batch_size = 1000  # examples per evaluation step
    c.train.optimizer = "adam"  # each party gets its own instance
    c.train.learning_rate = 1e-3  # for every party's optimizer
    c.train.momentum = 0.9  # used by sgd only
    # Keras's decoupled weight decay: each step w -= lr * weight_decay * w.
    c.train.weight_decay = 0.0
    # learning rate per epoch (splitkeras/learning_rate.py): constant | step
    # (x lr_decay_factor at each of lr_decay_epochs) | cosine
    c.train.lr_schedule = "constant"
    c.train.lr_decay_epochs = ""  # step: e.g. "30,60,90"
    c.train.lr_decay_factor = 0.1  # step: the factor at each decay epoch
    c.train.warmup_epochs = 0  # linear warm-up over the first epochs
    c.train.log_every_seconds = 5.0  # progress line and TensorBoard period
    c.train.checkpoint_every_steps = 1000  # also saved at each epoch end
    # stop (and checkpoint) early at this step; 0 = no. In one process
    # (splitkeras train) and where one client trains at a time (round robin,
    # centralized) only; refused elsewhere and over gRPC (serve, client,
    # launch), where runs train whole epochs.
    c.train.max_steps = 0
    c.train.run_eagerly = False  # run steps eagerly, for debugging
    # "" (float32) | mixed_float16 (GPUs) | mixed_bfloat16 (TPUs, recent CPUs):
    # every party computes in it, keeps float32 weights, scales its own loss.
    c.train.mixed_precision = ""
    c.train.jit_compile = False  # XLA-compile every party's step
    # Steps that hide the network (round robin, vanilla; README "Slow links"):
    # each batch's cut tensors go as this many micro-batches, sent without
    # waiting; one update per batch, equal to the unpipelined one (batch
    # statistics are per micro-batch).
    c.train.microbatches = 1
    # A client may send up to this many batches ahead of the gradients it
    # has received (0 = synchronous). It applies each batch's gradients to
    # its weights as they are by then, recomputing the batch's forward pass.
    c.train.max_staleness = 0
    c.train.metrics = "accuracy"  # comma-separated: accuracy, top5, ...

    c.vertical = ml_collections.ConfigDict()
    c.vertical.merge = "mean"  # how the server merges clients' cut tensors

    c.multitask = ml_collections.ConfigDict()
    c.multitask.head_from = "fc2"  # layer feeding the second task's head
    # second task's label of each class, e.g. "0,0,1,2" (class i -> group)
    c.multitask.groups = ""

    c.splitfed = ml_collections.ConfigDict()
    # Over gRPC: the fed server (averaging) in a process of its own, as in
    # the SplitFed paper, instead of beside the main server.
    c.splitfed.fed_process = False

    c.fedavg = ml_collections.ConfigDict()
    c.fedavg.local_epochs = 1  # local passes per client per FedAvg round

    # Resource tables (`splitkeras resource-table`): 0 / "" = from the dataset.
    c.accounting = ml_collections.ConfigDict()
    c.accounting.num_examples = 0  # training examples shared by the clients
    c.accounting.input_shape = ""  # e.g. "224,224,3"
    c.accounting.num_classes = 0  # outputs of the model
    c.accounting.epochs = 0  # 0 = config.train.epochs
    c.accounting.batch_size = 0  # per-client batch; 0 = config.train.batch_size
    c.accounting.clients = "100,500"  # client counts in the tables

    c.transport = ml_collections.ConfigDict()
    # wire format of cut tensors (both directions): float32 | float16 | bfloat16
    # | int8 (1 scale) | int8_channel (1 scale per channel) | topk:F (keep
    # the fraction F of largest |x|, e.g. topk:0.1; bare topk = topk:0.1)
    c.transport.codec = "float32"
    c.transport.activation_codec = ""  # client -> server; "" = transport.codec
    c.transport.gradient_codec = ""  # server -> client; "" = transport.codec

    # Privacy (splitkeras.privacy): defenses on every client, and leakage.
    c.privacy = ml_collections.ConfigDict()
    # NoPeekNN: lower dCor(raw batch, cut). "normalized" step: the privacy
    # gradient rescaled to alpha x the task gradient's norm (0.3-0.7 moved
    # LeNet's client by 21-60% in 5 epochs: docs/privacy.md); "loss":
    # alpha x dCor added to the loss (the paper's).
    c.privacy.nopeek_alpha = 0.0
    c.privacy.nopeek_step = "normalized"  # normalized | loss
    c.privacy.nopeek_window = 256  # earlier rows in each batch's dCor estimate
    c.privacy.nopeek_reencode = False  # the window's inputs through today's client
    c.privacy.nopeek_target = 0.0  # normalized: no privacy step below this dCor
    c.privacy.nopeek_warmup = 0  # normalized: the client's first updates without it
    c.privacy.nopeek_adapt = 0.0  # with a target: how fast alpha follows it
    c.privacy.activation_noise = 0.0  # std of Gaussian noise on sent activations
    c.privacy.gradient_max_norm = 0.0  # U-shaped: per-example bound on sent grads
    c.privacy.gradient_noise = 0.0  # U-shaped: std of noise on sent output grads
    # Marvell-style label protection (Li et al. 2022, splitkeras.privacy.
    # marvell): noise on the gradients the label holder sends (U-shaped: the
    # client's output gradients; vertical: the server's to the other
    # parties), power = this x |class mean gradient - rest's|^2 (0: off).
    c.privacy.marvell_strength = 0.0
    # Label DP (randomized response, Ghazi et al. 2021): the label holder's
    # training labels are randomized once with this epsilon (0: off).
    c.privacy.label_epsilon = 0.0
    # Hijack guard (after SplitGuard; splitkeras.privacy.hijack_guard): the
    # label holder's every N-th step after the warm-up gives a fraction of
    # its examples each other's labels and is not applied; an honest
    # server's gradients for them grow, a hijacking server's do not: alarm
    # when their norm over the other examples', averaged over the last
    # `hijack_probes` probes, is below the threshold. 0: off.
    c.privacy.hijack_probe_every = 0
    c.privacy.hijack_warmup = 20  # regular steps before the first probe
    c.privacy.hijack_threshold = 1.5
    c.privacy.hijack_probes = 5
    c.privacy.hijack_fraction = 0.25  # of a probe's examples
    # After the alarm the client applies no more updates from this server
    # (it stops being steered); False: it only warns.
    c.privacy.hijack_freeze = True
    c.privacy.leakage_examples = 512  # fixed test examples for leakage_dcor (0: off)
    # At the end of a run (in process, or in a gRPC run's evaluating client;
    # not vertical): a decoder trained on
    # this many training examples' cut outputs reconstructs the test examples
    # after the leakage set; grid, SSIM, MSE in TensorBoard (<workdir>/attacks),
    # reconstructions.png and summary.json (0: off).
    c.privacy.reconstruction_examples = 0
    c.privacy.reconstruction_epochs = 20  # the decoder's training epochs

    # The server party on several devices (splitkeras.distribute, README
    # "Scaling out"): none | mirrored (one machine's GPUs) | multi_worker
    # (several machines, TF_CONFIG). Vanilla round robin (split, vanilla).
    c.server = ml_collections.ConfigDict()
    c.server.strategy = "none"
    c.server.devices = ""  # mirrored: comma-separated devices; "" = all GPUs
    c.server.logical_cpus = 0  # >1: split the CPU into devices (tests, no GPU)
    # multi_worker: server processes the launcher starts on this machine
    # (`splitkeras launch`; across machines each gets its own TF_CONFIG).
    c.server.workers = 2

    # TensorFlow's thread pools in each process of a run (tf.config.threading;
    # 0 = TensorFlow's default: one thread per core). Processes that share a
    # machine's cores (a server and its clients on one machine) may want
    # fewer; measure first (benchmarks/README.md, "gRPC on loopback").
    c.runtime = ml_collections.ConfigDict()
    c.runtime.intra_op_threads = 0  # threads inside one op (a matmul, a conv)
    c.runtime.inter_op_threads = 0  # ops at once; 1 is refused (U-shaped server)

    # Server and clients as processes (`splitkeras serve`, `client`, `launch`).
    c.grpc = ml_collections.ConfigDict()
    c.grpc.max_message_mb = 64  # largest message, both ends (gRPC default: 4)
    c.grpc.timeout_seconds = 120.0  # deadline of every call
    c.grpc.retry_seconds = 300.0  # clients retry an unreachable server this long
    c.grpc.turn_timeout_seconds = 600.0  # a silent client's turn is then skipped
    return c

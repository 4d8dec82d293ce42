"""The configurations of AlphaGenome's adapter guide (seeds/000), verbatim, shared by the tests that
run them on the reference model, on AlphaGenome in Flax and side by side with the PyTorch port."""

NEW = {'my_atac': {'modality': 'atac', 'num_tracks': 4}}

GUIDE = {
  'linear': dict(mode='linear', remove_heads=['atac', 'dnase'], new_heads=NEW),
  'lora': dict(
    mode='lora',
    lora_rank=8,
    lora_alpha=16,
    lora_targets=['q_proj', 'v_proj'],
    remove_heads=['atac', 'dnase'],
    new_heads=NEW,
  ),
  'lora+locon4': dict(
    mode=['lora', 'locon'],
    lora_targets=['q_proj', 'v_proj'],
    locon_rank=4,
    locon_alpha=1,
    locon_targets=['down_blocks.4', 'down_blocks.5'],
    remove_heads=['atac'],
    new_heads=NEW,
  ),
  'ia3': dict(
    mode='ia3', ia3_targets=['k_proj', 'v_proj'], ia3_ff_targets=['fc2'], remove_heads=['atac'], new_heads=NEW
  ),
  'houlsby-block': dict(
    mode='houlsby',
    houlsby_latent_dim=8,
    houlsby_placement='block',
    houlsby_targets=['mha', 'mlp'],
    unfreeze_norm=True,
    remove_heads=['atac'],
    new_heads=NEW,
  ),
  'houlsby-linear': dict(
    mode='houlsby',
    houlsby_latent_dim=8,
    houlsby_placement='linear',
    houlsby_targets=['q_proj', 'v_proj'],
    remove_heads=['atac'],
    new_heads=NEW,
  ),
  'combined': dict(
    mode=['lora', 'locon'],
    lora_rank=8,
    lora_alpha=16,
    lora_targets=['q_proj', 'v_proj'],
    locon_rank=4,
    locon_alpha=1,
    locon_targets=['down_blocks.5'],
    remove_heads=['atac', 'dnase'],
    new_heads=NEW,
  ),
}
